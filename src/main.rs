//! The `postling` command: flags -> Config -> run; errors -> exit code.

#![forbid(unsafe_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use argh::FromArgs;

/// postling: a small, crash-safe SMTP server for home routers and Pis.
#[derive(FromArgs)]
struct Cli {
    /// print the version and exit
    #[argh(switch)]
    version: bool,
    #[argh(subcommand)]
    command: Option<Sub>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Sub {
    Serve(Serve),
}

/// Run the SMTP server in the foreground (systemd supervises it).
#[derive(FromArgs)]
#[argh(subcommand, name = "serve")]
struct Serve {
    /// the TOML config file (default: none, built-in defaults)
    #[argh(option)]
    config: Option<PathBuf>,
    /// address to listen on, e.g. 127.0.0.1:2525 or [::1]:2525; repeatable;
    /// replaces the config file's [[listen]] blocks
    #[argh(option)]
    listen: Vec<SocketAddr>,
    /// directory for the queue and state (default ./postling-data)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// stay in the foreground (postling always does; accepted for scripts)
    #[argh(switch)]
    foreground: bool,
}

fn init_logging() {
    // Under systemd (JOURNAL_STREAM set) journald adds timestamps itself.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |buf, record| {
            if journald {
                writeln!(
                    buf,
                    "{}: {}",
                    record.level().as_str().to_lowercase(),
                    record.args()
                )
            } else {
                writeln!(
                    buf,
                    "{} {}: {}",
                    buf.timestamp_seconds(),
                    record.level().as_str().to_lowercase(),
                    record.args()
                )
            }
        })
        .init();
}

fn main() -> ExitCode {
    let cli: Cli = argh::from_env();
    if cli.version {
        println!("postling {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let Some(Sub::Serve(serve)) = cli.command else {
        eprintln!("postling: a subcommand is needed; try `postling serve` or `postling --help`");
        return ExitCode::from(64); // EX_USAGE
    };
    let _ = serve.foreground;
    init_logging();
    let flags = postling::config::Flags {
        config: serve.config,
        listen: serve.listen,
        data_dir: serve.data_dir,
    };
    let config = match postling::config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("postling: {e}");
            return ExitCode::from(78); // EX_CONFIG
        }
    };
    let server = match postling::server::Server::start(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("postling: {e}");
            return ExitCode::from(71); // EX_OSERR
        }
    };
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postling: {e}");
            ExitCode::from(71)
        }
    }
}
