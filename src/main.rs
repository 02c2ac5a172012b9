//! The `postling` command: flags -> Config -> run; errors -> exit code.

#![forbid(unsafe_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use argh::FromArgs;

/// postling: a small, crash-safe SMTP server for home routers and Pis.
#[derive(FromArgs)]
#[argh(
    note = "`postling sendmail [-t] [-i] [-f SENDER] [-F NAME] [-bs|-bp|-q] [RCPT...]` is the sendmail(8) interface (also when invoked as `sendmail`)."
)]
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
    Queue(QueueCmd),
    Passwd(Passwd),
    Check(Check),
}

/// Validate the config, then test DNS, the smarthost or MX, TLS and AUTH.
#[derive(FromArgs)]
#[argh(subcommand, name = "check")]
struct Check {
    /// the TOML config file (default: /etc/postling/postling.toml if present)
    #[argh(option)]
    config: Option<PathBuf>,
    /// only validate the config; no network
    #[argh(switch)]
    offline: bool,
    /// also send a test message to this address
    #[argh(option)]
    send_test: Option<String>,
}

/// Print a users-file line (Argon2id) for inbound AUTH; the password is
/// read from standard input: `postling passwd alice >> /etc/postling/users`.
#[derive(FromArgs)]
#[argh(subcommand, name = "passwd")]
struct Passwd {
    /// the user name
    #[argh(positional)]
    user: String,
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

/// Show the mail queue, or retry or delete queued mail (`mailq` is `queue
/// list`). Without --config or --data-dir, /etc/postling/postling.toml is
/// read if it exists, so the tools find the installed daemon's queue.
#[derive(FromArgs)]
#[argh(subcommand, name = "queue")]
struct QueueCmd {
    /// the daemon's TOML config file, to find its data_dir
    #[argh(option)]
    config: Option<PathBuf>,
    /// the daemon's data directory (overrides the config file's data_dir)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    #[argh(subcommand)]
    action: Option<QueueAction>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum QueueAction {
    List(QueueList),
    Show(QueueShow),
    Flush(QueueFlush),
    Delete(QueueDelete),
}

/// List queued messages like Postfix's mailq (the default).
#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
struct QueueList {
    /// print a JSON array for scripts
    #[argh(switch)]
    json: bool,
    /// the daemon's TOML config file, to find its data_dir
    #[argh(option)]
    config: Option<PathBuf>,
    /// the daemon's data directory (overrides the config file's data_dir)
    #[argh(option)]
    data_dir: Option<PathBuf>,
}

/// Print one message's envelope and header.
#[derive(FromArgs)]
#[argh(subcommand, name = "show")]
struct QueueShow {
    /// the queue id
    #[argh(positional)]
    id: String,
    /// the daemon's TOML config file, to find its data_dir
    #[argh(option)]
    config: Option<PathBuf>,
    /// the daemon's data directory (overrides the config file's data_dir)
    #[argh(option)]
    data_dir: Option<PathBuf>,
}

/// Try one message, or every message, now.
#[derive(FromArgs)]
#[argh(subcommand, name = "flush")]
struct QueueFlush {
    /// the queue id (default: every queued message)
    #[argh(positional)]
    id: Option<String>,
    /// the daemon's TOML config file, to find its data_dir
    #[argh(option)]
    config: Option<PathBuf>,
    /// the daemon's data directory (overrides the config file's data_dir)
    #[argh(option)]
    data_dir: Option<PathBuf>,
}

/// Remove a message from the queue without delivering or bouncing it.
#[derive(FromArgs)]
#[argh(subcommand, name = "delete")]
struct QueueDelete {
    /// the queue id
    #[argh(positional)]
    id: String,
    /// the daemon's TOML config file, to find its data_dir
    #[argh(option)]
    config: Option<PathBuf>,
    /// the daemon's data directory (overrides the config file's data_dir)
    #[argh(option)]
    data_dir: Option<PathBuf>,
}

/// mailq: list the mail queue (the same as `postling queue list`).
#[derive(FromArgs)]
struct Mailq {
    /// print a JSON array for scripts
    #[argh(switch)]
    json: bool,
    /// the daemon's TOML config file, to find its data_dir
    #[argh(option)]
    config: Option<PathBuf>,
    /// the daemon's data directory (overrides the config file's data_dir)
    #[argh(option)]
    data_dir: Option<PathBuf>,
}

/// Loads the config the queue tools need (only its data_dir is used) and
/// runs `cmd`; `name` prefixes error messages.
fn queue(
    name: &str,
    cmd: postling::queue_cli::Command,
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
) -> ExitCode {
    let config = match (config, &data_dir) {
        (None, None) => postling::config::installed_or(None),
        (config, _) => config,
    };
    let flags = postling::config::Flags {
        config,
        listen: Vec::new(),
        data_dir,
        client: true,
    };
    let config = match postling::config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(78); // EX_CONFIG
        }
    };
    let mut out = std::io::stdout().lock();
    match postling::queue_cli::run(&cmd, &config.data_dir, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `postling queue ...`: the leaf's location flags win over the parent's.
fn queue_command(q: QueueCmd) -> ExitCode {
    use postling::queue_cli::Command;
    let (cmd, config, data_dir) = match q.action {
        None => (Command::List { json: false }, None, None),
        Some(QueueAction::List(a)) => (Command::List { json: a.json }, a.config, a.data_dir),
        Some(QueueAction::Show(a)) => (Command::Show(a.id), a.config, a.data_dir),
        Some(QueueAction::Flush(a)) => (Command::Flush(a.id), a.config, a.data_dir),
        Some(QueueAction::Delete(a)) => (Command::Delete(a.id), a.config, a.data_dir),
    };
    queue(
        "postling",
        cmd,
        config.or(q.config),
        data_dir.or(q.data_dir),
    )
}

/// The binary invoked as `mailq` (a symlink): `queue list`.
fn mailq(argv0: &str, args: &[String]) -> ExitCode {
    match parse::<Mailq>(argv0, args) {
        Ok(m) => queue(
            "mailq",
            postling::queue_cli::Command::List { json: m.json },
            m.config,
            m.data_dir,
        ),
        Err(code) => code,
    }
}

/// Parses `args` (without argv[0]) as argh does, but a usage error exits
/// 64 (EX_USAGE, sysexits.h) instead of argh's 1; `--help` exits 0.
fn parse<T: FromArgs>(argv0: &str, args: &[String]) -> Result<T, ExitCode> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let name = std::path::Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(argv0);
    T::from_args(&[name], &args).map_err(|argh::EarlyExit { output, status }| {
        if status.is_ok() {
            say(&output);
            ExitCode::SUCCESS
        } else {
            eprintln!(
                "{}\nRun {name} --help for more information.",
                output.trim_end()
            );
            ExitCode::from(64) // EX_USAGE
        }
    })
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

fn check(c: Check) -> ExitCode {
    static LOG: CheckLog = CheckLog;
    if log::set_logger(&LOG).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let flags = postling::config::Flags {
        config: postling::config::installed_or(c.config),
        ..Default::default()
    };
    let config = match postling::config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            say(&format!("FAIL  config: {e}"));
            return ExitCode::from(78); // EX_CONFIG
        }
    };
    let opts = postling::check::Options {
        offline: c.offline,
        send_test: c.send_test,
    };
    match postling::check::run(&config, &opts, &mut std::io::stdout()) {
        postling::check::Outcome::Passed => ExitCode::SUCCESS,
        postling::check::Outcome::Config => ExitCode::from(78), // EX_CONFIG
        postling::check::Outcome::Unavailable => ExitCode::from(69), // EX_UNAVAILABLE
    }
}

/// `postling check` shows the warnings `serve` would log (an alias target
/// without a mailbox, say) as report lines of their own.
struct CheckLog;

impl log::Log for CheckLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            say(&format!("WARN  {}", record.args()));
        }
    }
    fn flush(&self) {}
}

fn passwd(user: &str) -> ExitCode {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut out = std::io::stdout();
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprint!("Password for {user} (shown as you type): ");
    }
    match postling::auth::run_passwd(user, &mut input, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postling passwd: {e}");
            ExitCode::from(65) // EX_DATAERR
        }
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_default();
    let name = std::path::Path::new(&argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    let args: Vec<String> = args.collect();
    if name == "mailq" {
        return mailq(&argv0, &args);
    }
    // sendmail's flags are its own (-t, -oi, -fADDR), not argh's: passed raw.
    if name == "sendmail" {
        return postling::sendmail::main(&argv0, &args);
    }
    if name == "newaliases" {
        return postling::sendmail::main(&argv0, &["-bi".to_string()]);
    }
    if args.first().map(String::as_str) == Some("sendmail") {
        return postling::sendmail::main(&argv0, &args[1..]);
    }
    let cli: Cli = match parse(&argv0, &args) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if cli.version {
        say(&format!("postling {}", env!("CARGO_PKG_VERSION")));
        return ExitCode::SUCCESS;
    }
    let serve = match cli.command {
        Some(Sub::Serve(serve)) => serve,
        Some(Sub::Queue(q)) => return queue_command(q),
        Some(Sub::Passwd(p)) => return passwd(&p.user),
        Some(Sub::Check(c)) => return check(c),
        None => {
            eprintln!(
                "postling: a subcommand is needed; try `postling serve` or `postling --help`"
            );
            return ExitCode::from(64); // EX_USAGE
        }
    };
    let _ = serve.foreground;
    init_logging();
    let flags = postling::config::Flags {
        config: serve.config,
        listen: serve.listen,
        data_dir: serve.data_dir,
        client: false,
    };
    let config = match postling::config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("postling: {e}");
            return ExitCode::from(78); // EX_CONFIG
        }
    };
    let server = match postling::server::Server::start(config, flags) {
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

/// Prints one line on stdout. A closed pipe (`postling --help | head -c1`)
/// or a full disk is not worth a panic, which aborts the release build.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}
