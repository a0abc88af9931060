use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wasmtap::{check, config::Config, daemon, plugins::bundled};

#[derive(Parser)]
#[command(version, about = "eBPF probes streamed in batches into sandboxed WebAssembly plugins")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// Configuration file (TOML); without it the embedded default runs the bundled plugins.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to serve /metrics, /healthz and /status on (overrides the config).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Log as JSON lines instead of text.
        #[arg(long)]
        json_logs: bool,
    },
    /// Check what this machine offers wasmtap, with a fix for each problem.
    Check,
    /// Print the embedded default configuration.
    DefaultConfig,
    /// List the bundled plugins.
    Plugins,
    /// Compile a plugin component (the daemon runs this in a child process, under
    /// an address-space limit and a deadline).
    #[command(hide = true)]
    CompilePlugin { input: PathBuf, output: PathBuf, max_memory_bytes: u64 },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, listen, json_logs } => {
            // stderr, like plugin records in JSON mode (written by the log sink).
            let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
            );
            if json_logs { logs.json().init() } else { logs.init() }
            wasmtap::sinks::logs::use_json(json_logs);
            let result = Config::load(config.as_deref()).and_then(|mut config| {
                if let Some(listen) = listen {
                    config.listen = listen;
                }
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?
                    .block_on(daemon::run(config))
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check => if check::run() { ExitCode::SUCCESS } else { ExitCode::FAILURE },
        Command::DefaultConfig => {
            print!("{}", wasmtap::config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::Plugins => {
            bundled::names().for_each(|n| println!("{n}"));
            ExitCode::SUCCESS
        }
        Command::CompilePlugin { input, output, max_memory_bytes } => {
            match wasmtap::plugins::engine::compile_to_file(&input, &output, max_memory_bytes) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
