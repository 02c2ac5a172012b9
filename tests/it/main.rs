//! The integration suite: one binary that runs the real `postling` server on
//! 127.0.0.1:0 and talks to it with raw SMTP and with a real client library
//! (lettre), then reads the Maildir and queue files it wrote.

mod check;
mod crash;
mod data;
mod delivery;
mod fuzz_regressions;
mod lifecycle;
mod limits;
mod maildrop;
mod protocol;
mod queue;
mod relay;
mod security;
mod sendmail;
mod submit;
mod util;
