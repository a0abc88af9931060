use std::{io::IsTerminal as _, net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wasmtap::{check, cli, config::Config, daemon, plugins::bundled};

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
        /// The admin API's Unix socket (overrides the config).
        #[arg(long)]
        admin_socket: Option<PathBuf>,
        /// Capabilities to keep, comma-separated (overrides `capabilities_keep`;
        /// default bpf,perfmon); every other one is dropped at start.
        #[arg(long, value_delimiter = ',')]
        capabilities_keep: Option<Vec<String>>,
        /// Also record every batch the plugins get to this file (for `wasmtap replay`);
        /// written until the daemon stops.
        #[arg(long)]
        record: Option<PathBuf>,
        /// Stop writing the recording past this many bytes (later batches are counted as
        /// dropped).
        #[arg(long, default_value_t = 1 << 30)]
        record_max_bytes: u64,
    },
    /// Change the running daemon's plugins through its admin socket.
    Plugin {
        /// The daemon's admin socket (default: the default `admin_socket`).
        #[arg(long, global = true)]
        socket: Option<PathBuf>,
        #[command(subcommand)]
        verb: PluginVerb,
    },
    /// Record the probes' batches to a file (needs root), to replay plugins over later.
    Record {
        /// The recording to create (an existing file is never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// How long to record (e.g. 30s, 5m); default: until Ctrl-C or SIGTERM.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// Kinds to record, comma-separated (default: syscall, process, sched, tcp).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
        /// Only these processes (and, for the kinds that follow children, their children).
        #[arg(long = "pid")]
        pids: Vec<u32>,
        /// Only tasks in these cgroup v2 ids.
        #[arg(long = "cgroup")]
        cgroups: Vec<u64>,
        /// Only tasks with these names.
        #[arg(long = "comm")]
        comms: Vec<String>,
        /// A kind's filter parameter, KIND:NAME=V1,V2 (e.g. syscall:syscalls=read,write,
        /// uprobe:probes=usdt:/usr/bin/x:provider:name); repeat for more.
        #[arg(long = "param")]
        params: Vec<String>,
        /// Stop writing past this many bytes (what comes later is counted as dropped).
        #[arg(long, default_value_t = 1 << 30)]
        max_bytes: u64,
    },
    /// Run one plugin over a recording (no root needed): prints its metrics (Prometheus
    /// text) on stdout, its log records as JSON lines on stderr.
    Replay {
        recording: PathBuf,
        #[command(flatten)]
        source: Source,
        /// The plugin's instance name (default: the file's or bundled plugin's name).
        #[arg(long)]
        name: Option<String>,
        /// A `key = value` line (TOML) of the plugin's config; repeat for more.
        #[arg(long = "set")]
        set: Vec<String>,
    },
    /// Check what this machine offers wasmtap, with a fix for each problem.
    Check,
    /// Validate a config file (and that its plugins' components are there) without
    /// running or loading anything; exits 1 on any error.
    CheckConfig { file: PathBuf },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// List the bundled plugins.
    Plugins,
    /// Compile the plugin component on stdin to stdout (the daemon runs this in a
    /// child process, under an address-space limit and a deadline).
    #[command(hide = true)]
    CompilePlugin { max_memory_bytes: u64 },
}

#[derive(Subcommand)]
enum PluginVerb {
    /// List the plugins with state, version (content hash) and stats.
    List,
    /// Load a plugin.
    Load {
        name: String,
        #[command(flatten)]
        source: Source,
        /// A `key = value` line (TOML) of the plugin's config; repeat for more.
        #[arg(long = "set")]
        set: Vec<String>,
    },
    /// Replace a running plugin with a new build and/or config, without losing events.
    Replace {
        name: String,
        #[command(flatten)]
        source: Source,
        /// A `key = value` line (TOML) of the plugin's new config; given, it replaces the
        /// whole config; repeat for more keys.
        #[arg(long = "set")]
        set: Vec<String>,
    },
    /// Unload a plugin.
    Unload { name: String },
    /// Re-read the daemon's config file and apply the difference (as SIGHUP does).
    Reload,
    /// Create a plugin crate (outside any checkout) that builds for wasm32-wasip2 and
    /// passes its own test.
    New {
        name: String,
        /// The directory to create it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The wasmtap-sdk crate to depend on by path (default: this build's checkout's,
        /// if present, else the published version).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Validate a plugin component offline (no daemon): size, WIT version, imports
    /// (and the std features behind them), and a dry run of its init.
    Check {
        file: PathBuf,
        /// A `key = value` line (TOML) of the config for the dry run; repeat for more.
        #[arg(long = "set")]
        set: Vec<String>,
    },
}

#[derive(clap::Args)]
#[group(multiple = false)]
struct Source {
    /// A component file.
    #[arg(long)]
    path: Option<PathBuf>,
    /// A plugin built into the daemon.
    #[arg(long)]
    bundled: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config: config_path, listen, json_logs, admin_socket, capabilities_keep, record, record_max_bytes } => {
            // stderr, like plugin records in JSON mode (written by the log sink).
            // Colours only for a person at a terminal, never into a file or journal.
            let logs = tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
            if json_logs {
                logs.json().init()
            } else {
                logs.init()
            }
            wasmtap::sinks::logs::use_json(json_logs);
            let overrides = wasmtap::server::admin::Overrides { listen, admin_socket, capabilities_keep };
            let result = Config::load(config_path.as_deref())
                .map(|config| overrides.apply(config))
                // Before any thread exists: capabilities are per thread.
                .and_then(|config| {
                    wasmtap::privileges::drop_all_but(&wasmtap::privileges::parse(&config.capabilities_keep)?)?;
                    Ok(config)
                })
                .and_then(|config| {
                    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
                    runtime.block_on(daemon::run(config, config_path, overrides, record.map(|path| (path, record_max_bytes))))
                });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Plugin { verb: PluginVerb::Check { file, set }, .. } => {
            tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(EnvFilter::new("warn")).init();
            match wasmtap::plugins::inspect::check(&file, &set) {
                Ok((report, ok)) => {
                    print!("{report}");
                    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Plugin { verb: PluginVerb::New { name, dir, sdk }, .. } => match wasmtap::plugins::scaffold::new_plugin(&name, &dir, sdk) {
            Ok(next) => {
                print!("{next}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Plugin { socket, verb } => {
            let socket = socket.unwrap_or_else(wasmtap::config::default_admin_socket);
            let request = match verb {
                PluginVerb::List => cli::Request::List,
                PluginVerb::Load { name, source, set } => cli::Request::Load(cli::section(Some(&name), source.path, source.bundled, &set)),
                PluginVerb::Replace { name, source, set } => cli::Request::Replace(name, cli::section(None, source.path, source.bundled, &set)),
                PluginVerb::Unload { name } => cli::Request::Unload(name),
                PluginVerb::Reload => cli::Request::Reload,
                PluginVerb::Check { .. } | PluginVerb::New { .. } => unreachable!("handled above"),
            };
            match cli::run(&socket, request) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Record { out, duration, kinds, pids, cgroups, comms, params, max_bytes } => {
            tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(EnvFilter::new("warn")).init();
            let options = wasmtap::recording::record::Options { out, duration, kinds, pids, cgroups, comms, params, max_bytes };
            match wasmtap::recording::record::record(&options) {
                Ok(summary) => {
                    let counts: Vec<String> = summary.records.iter().map(|(kind, n)| format!("{n} {kind}")).collect();
                    eprintln!("recorded {} records ({} bytes); {} dropped", counts.join(", "), summary.bytes, summary.dropped);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Replay { recording, source, name, set } => {
            tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(EnvFilter::new("warn")).init();
            let name = name
                .or_else(|| source.bundled.clone())
                .or_else(|| source.path.as_ref().and_then(|p| p.file_stem()).map(|s| s.to_string_lossy().replace('_', "-")));
            let Some(name) = name.filter(|_| source.path.is_some() || source.bundled.is_some()) else {
                eprintln!("error: name the plugin: --path FILE.wasm or --bundled NAME");
                return ExitCode::FAILURE;
            };
            let plugin = cli::section(Some(&name), source.path, source.bundled, &set);
            match wasmtap::recording::replay::replay(&wasmtap::recording::replay::Options { recording, plugin }) {
                Ok(outcome) => {
                    print!("{}", outcome.metrics);
                    eprintln!(
                        "replayed {} records in {} batches: {:.0} ms in the plugin ({:.0} records/s); loaded in {} ms, init {} ms",
                        outcome.records,
                        outcome.batches,
                        outcome.in_batches.as_secs_f64() * 1e3,
                        outcome.records as f64 / outcome.in_batches.as_secs_f64().max(1e-9),
                        outcome.load.as_millis(),
                        outcome.init.as_millis()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check => {
            if check::run() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::CheckConfig { file } => match wasmtap::config::Config::check(&file) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::DefaultConfig => {
            print!("{}", wasmtap::config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::Plugins => {
            bundled::names().for_each(|n| println!("{n}"));
            ExitCode::SUCCESS
        }
        Command::CompilePlugin { max_memory_bytes } => {
            match wasmtap::privileges::drop_everything().and_then(|()| wasmtap::plugins::engine::compile_stream(max_memory_bytes)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
