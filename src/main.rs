//! kproxy's entry point: flags → `Config`, logging, then the daemon or a one-shot mode.

/// mimalloc instead of glibc malloc: a cold start is allocation-heavy (see Cargo.toml).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::Parser;
use kproxy::config::{Config, Flags};

fn init_logging(cfg: &Config) {
    // kube-proxy's -v levels: 0-3 info, 4-5 debug, 6+ trace. RUST_LOG, when set, wins.
    let level = match cfg.verbosity {
        0..=3 => "info",
        4..=5 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    use std::io::IsTerminal;
    // Colour only on a terminal: logs in files and journald stay plain text.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if cfg.json_logs {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> ExitCode {
    let cfg = match Flags::parse().into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kproxy: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&cfg);
    for u in &cfg.unimplemented {
        tracing::warn!("{u} is accepted for compatibility but not implemented yet; it has no effect");
    }
    if cfg.cleanup {
        return match kproxy::daemon::cleanup() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kproxy: cleanup failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if cfg.dry_run {
        print!("{}", kproxy::daemon::dry_run(&cfg));
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kproxy: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(kproxy::daemon::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
