//! kproxy's entry point (the daemon mode lands with the backend).
use clap::Parser;
fn main() {
    let cfg = kproxy::config::Flags::parse().into_config().unwrap_or_else(|e| { eprintln!("kproxy: {e}"); std::process::exit(2) });
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    if cfg.dry_run { print!("{}", kproxy::daemon::dry_run(&cfg)); }
}
