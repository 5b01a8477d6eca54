//! The `larder` server binary: parse the configuration, set up logging, run
//! until SIGINT or SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use larder::app::{shutdown_signal, App};
use larder::config::{Config, LogFormat};

/// `--healthcheck`: one `GET /healthz` over a plain socket, with a
/// two-second limit, to the admin listener when there is one (it needs no
/// token and speaks plain HTTP whatever the main listener does), else to
/// the main one.
fn healthcheck(config: &Config) -> ExitCode {
    use std::io::{Read, Write};
    let mut addr = config.admin_listen.unwrap_or(config.listen);
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let limit = std::time::Duration::from_secs(2);
    let healthy = std::net::TcpStream::connect_timeout(&addr, limit)
        .and_then(|mut stream| {
            stream.set_read_timeout(Some(limit))?;
            stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut head = [0u8; 12];
            stream.read_exact(&mut head)?;
            Ok(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"))
        })
        .unwrap_or(false);
    if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let config = Config::parse();
    if config.healthcheck {
        return healthcheck(&config);
    }
    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Pretty => builder.init(),
    }
    // A panic (a bug, or a dependency's on bad data) is logged as one line;
    // the request or task that hit it fails, the process does not print a
    // backtrace at users.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "internal error");
    }));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let app = App::build(config).await?;
        app.run_until_stopped(shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A configuration the server refuses (a bad tokens file, a flag
        // out of range) is exit 2, as for a bad command line.
        Err(e @ larder::app::AppError::Config(_)) => {
            tracing::error!("{e}");
            ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
