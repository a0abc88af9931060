//! Plugin logs leaving the node: a plugin logs one record per event of a workload with a
//! known count, and every output receives each record exactly, with its fields: a real
//! rsyslog (imtcp, structured data parsed by mmpstrucdata, written as JSON), Loki's push
//! API and OTLP logs over HTTP (receivers that decode the published formats, the latter
//! with the OpenTelemetry project's own Python bindings), and a JSON-lines file. Then the
//! syslog receiver goes down: the output holds what its buffer bounds, counts the rest,
//! and the plugins go on without a lost event.

use std::{
    collections::BTreeSet,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use wasmtap_tests::{Daemon, HOSTILE_WASM, TempDir, privileged_or_skip, run_workload, sample, unique_comm, wait_for};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

fn wait_for_port(port: u16, what: &str) {
    wait_for(Duration::from_secs(20), what, || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
}

/// The JSON lines of `path` (none if it does not exist yet).
fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect()
}

/// A real rsyslogd on loopback, writing every message it gets as one JSON object (the
/// RFC 5424 header fields, MSG, and the structured data parsed by mmpstrucdata).
struct Rsyslog {
    child: Child,
    conf: PathBuf,
    port: u16,
}

impl Rsyslog {
    fn start(dir: &Path, port: u16, out: &Path) -> Self {
        let work = dir.join("rsyslog-work");
        std::fs::create_dir_all(&work).unwrap();
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                r#"global(workDirectory="{work}" maxMessageSize="64k")
module(load="imtcp")
module(load="mmpstrucdata")
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="in")
template(name="json" type="string" string="%$!%\n")
ruleset(name="in") {{
  action(type="mmpstrucdata" sd_name.lowercase="off")
  set $!host = $hostname;
  set $!app = $app-name;
  set $!msgid = $msgid;
  set $!severity = $syslogseverity-text;
  set $!facility = $syslogfacility-text;
  set $!msg = $msg;
  action(type="omfile" file="{out}" template="json")
}}
"#,
                work = work.display(),
                out = out.display()
            ),
        )
        .unwrap();
        Self::spawn(conf, port)
    }

    fn spawn(conf: PathBuf, port: u16) -> Self {
        let pid_file = conf.with_extension("pid");
        let child = Command::new("rsyslogd")
            .args(["-n", "-f"])
            .arg(&conf)
            .arg("-i")
            .arg(&pid_file)
            .stdout(Stdio::null())
            .spawn()
            .expect("rsyslogd is installed (./dev setup installs rsyslog)");
        wait_for_port(port, "rsyslogd to listen");
        Self { child, conf, port }
    }

    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.stop();
        *self = Self::spawn(self.conf.clone(), self.port);
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// tests/receivers/log_receiver.py: Loki push (JSON) and OTLP logs (protobuf).
struct HttpReceiver(Child);

impl HttpReceiver {
    fn start(port: u16, out: &Path) -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let python = root.join("target/dev-python/bin/python");
        assert!(python.is_file(), "{} is missing: `./dev setup` makes it (the OTLP receiver needs PyPI's opentelemetry-proto)", python.display());
        let child = Command::new(python).arg(root.join("tests/receivers/log_receiver.py")).arg(port.to_string()).arg(out).spawn().expect("start the receiver");
        wait_for_port(port, "the Loki/OTLP receiver to listen");
        Self(child)
    }
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The logger plugin's section: one record per getppid of `comm`, fields `n` (1, 2, …),
/// `syscall` and `token`.
fn logger(comm: &str) -> String {
    format!(
        r#"
[[plugin]]
name = "logger"
path = "{HOSTILE_WASM}"
log_bytes_per_second = 10000000
[plugin.config]
mode = "log-each"
comm = "{comm}"
syscall = "getppid"
token = "tok"
"#
    )
}

fn numbers(records: &[Value], n: impl Fn(&Value) -> &Value) -> BTreeSet<u64> {
    records.iter().map(|r| n(r).as_str().expect("n is a string").parse().unwrap()).collect()
}

#[test]
fn plugin_logs_reach_rsyslog_loki_otlp_and_a_file_exactly_with_their_fields() {
    if !privileged_or_skip("plugin_logs_reach_rsyslog_loki_otlp_and_a_file_exactly_with_their_fields") {
        return;
    }
    const EVENTS: u64 = 400;
    let dir = TempDir::new();
    let (syslog_port, http_port) = (free_port(), free_port());
    let (syslog_out, http_out, file_out) = (dir.0.join("syslog.json"), dir.0.join("http.json"), dir.0.join("plugins.jsonl"));
    let _rsyslog = Rsyslog::start(&dir.0, syslog_port, &syslog_out);
    let _receiver = HttpReceiver::start(http_port, &http_out);
    let comm = unique_comm("logs");
    let config = format!(
        r#"
[logs]
node = "test-node"

[[logs.output]]
kind = "syslog"
address = "127.0.0.1:{syslog_port}"
batch_wait_ms = 50

[[logs.output]]
kind = "loki"
url = "http://127.0.0.1:{http_port}/loki/api/v1/push"
labels = {{ cluster = "test" }}
batch_wait_ms = 50

[[logs.output]]
kind = "otlp"
url = "http://127.0.0.1:{http_port}/v1/logs"
batch_wait_ms = 50

[[logs.output]]
kind = "json-lines"
path = "{file}"
batch_wait_ms = 50
{logger}"#,
        file = file_out.display(),
        logger = logger(&comm)
    );
    let daemon = Daemon::start(Some(&config));
    run_workload(&comm, EVENTS, 0);
    let all: BTreeSet<u64> = (1..=EVENTS).collect();
    let count = |path: &Path, receiver: Option<&str>| json_lines(path).into_iter().filter(|r| receiver.is_none_or(|k| r["receiver"] == k)).collect::<Vec<_>>();
    let delivered = |output: &str| sample(&daemon.metrics(), "wasmtap_log_records_total", &[("output", output)]).unwrap_or(0.0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !["syslog", "loki", "otlp", "json-lines"].iter().all(|o| delivered(o) >= EVENTS as f64) {
        let log_metrics: Vec<String> = daemon.metrics().lines().filter(|l| l.starts_with("wasmtap_log")).map(str::to_owned).collect();
        assert!(std::time::Instant::now() < deadline, "not every record delivered:\n{}\n{}", log_metrics.join("\n"), daemon.log());
        std::thread::sleep(Duration::from_millis(50));
    }

    // rsyslog: RFC 5424 header, the host's SD element, the plugin's fields as an SD element.
    let syslog = count(&syslog_out, None);
    assert_eq!(syslog.len() as u64, EVENTS, "rsyslog got each record once");
    assert_eq!(numbers(&syslog, |r| &r["rfc5424-sd"]["fields@32473"]["n"]), all);
    let r = &syslog[0];
    assert_eq!((r["host"].as_str(), r["app"].as_str(), r["msgid"].as_str()), (Some("test-node"), Some("wasmtap"), Some("plugin")));
    assert_eq!((r["severity"].as_str(), r["facility"].as_str(), r["msg"].as_str()), (Some("info"), Some("local0"), Some("event seen")));
    assert_eq!(r["rfc5424-sd"]["wasmtap@32473"], serde_json::json!({"plugin": "logger", "level": "info"}));
    assert_eq!(r["rfc5424-sd"]["fields@32473"]["syscall"], "110");
    assert_eq!(r["rfc5424-sd"]["fields@32473"]["token"], "tok");

    // Loki: low-cardinality stream labels, the fields as structured metadata.
    let loki = count(&http_out, Some("loki"));
    assert_eq!(loki.len() as u64, EVENTS);
    assert_eq!(numbers(&loki, |r| &r["metadata"]["n"]), all);
    assert_eq!(loki[0]["labels"], serde_json::json!({"service_name": "wasmtap", "node": "test-node", "plugin": "logger", "level": "info", "cluster": "test"}));
    assert_eq!((loki[0]["line"].as_str(), loki[0]["metadata"]["token"].as_str()), (Some("event seen"), Some("tok")));

    // OTLP: resource, scope, severity, body and attributes.
    let otlp = count(&http_out, Some("otlp"));
    assert_eq!(otlp.len() as u64, EVENTS);
    assert_eq!(numbers(&otlp, |r| &r["attributes"]["n"]), all);
    let r = &otlp[0];
    assert_eq!(r["resource"], serde_json::json!({"service.name": "wasmtap", "host.name": "test-node"}));
    assert_eq!((r["severity"].as_u64(), r["severity_text"].as_str(), r["body"].as_str()), (Some(9), Some("INFO"), Some("event seen")));
    assert_eq!((r["attributes"]["wasmtap.plugin"].as_str(), r["attributes"]["syscall"].as_str()), (Some("logger"), Some("110")));
    assert!(r["time"].as_u64().unwrap() > 1_700_000_000_000_000_000, "a real timestamp: {}", r["time"]);

    // The file: one JSON object per record.
    let file = count(&file_out, None);
    assert_eq!(file.len() as u64, EVENTS);
    assert_eq!(numbers(&file, |r| &r["fields"]["n"]), all);
    assert_eq!((file[0]["node"].as_str(), file[0]["plugin"].as_str(), file[0]["level"].as_str()), (Some("test-node"), Some("logger"), Some("info")));

    let metrics = daemon.metrics();
    for output in ["syslog", "loki", "otlp", "json-lines"] {
        assert_eq!(delivered(output), EVENTS as f64, "{output}");
        let dropped = wasmtap_tests::sum_samples(&metrics, "wasmtap_log_dropped_records_total", &[("output", output)]);
        assert_eq!(dropped, 0.0, "{output} dropped nothing");
    }
}

#[test]
fn a_syslog_receiver_down_holds_what_the_buffer_bounds_counts_the_rest_and_blocks_no_plugin() {
    if !privileged_or_skip("a_syslog_receiver_down_holds_what_the_buffer_bounds_counts_the_rest_and_blocks_no_plugin") {
        return;
    }
    const FIRST: u64 = 50;
    const OUTAGE: u64 = 1000;
    const BUFFER: u64 = 200;
    let dir = TempDir::new();
    let port = free_port();
    let out = dir.0.join("syslog.json");
    let mut rsyslog = Rsyslog::start(&dir.0, port, &out);
    let comm = unique_comm("logdown");
    let config = format!(
        r#"
[[logs.output]]
kind = "syslog"
address = "127.0.0.1:{port}"
buffer_records = {BUFFER}
batch_records = 50
batch_wait_ms = 50
max_backoff_ms = 200
{logger}
[[plugin]]
name = "syscall-latency"
bundled = "syscall-latency"
[plugin.config]
comms = ["{comm}"]
"#,
        logger = logger(&comm)
    );
    let daemon = Daemon::start(Some(&config));
    let received = || json_lines(&out);
    run_workload(&comm, FIRST, 0);
    wait_for(Duration::from_secs(30), "rsyslog to get the first records", || (received().len() as u64 == FIRST).then_some(()));

    rsyslog.stop();
    run_workload(&comm, OUTAGE, 0);
    let metric = |name: &str, labels: &[(&str, &str)]| sample(&daemon.metrics(), name, labels).unwrap_or(0.0);
    // The plugins are not held up: both have every event while the receiver is down.
    wait_for(Duration::from_secs(30), "the buffer to fill and refuse the rest", || {
        (metric("wasmtap_log_dropped_records_total", &[("output", "syslog"), ("reason", "buffer_full")]) == (OUTAGE - BUFFER) as f64).then_some(())
    });
    let total = (FIRST + OUTAGE) as f64;
    wait_for(Duration::from_secs(10), "both plugins to have every event", || {
        (metric("wasmtap_plugin_events_total", &[("plugin", "logger")]) == total
            && metric("syscall_latency_seconds_count", &[("comm", &comm), ("syscall", "getppid")]) == total)
            .then_some(())
    });
    assert_eq!(metric("wasmtap_log_buffered_records", &[("output", "syslog")]), BUFFER as f64);
    assert!(metric("wasmtap_log_send_errors_total", &[("output", "syslog")]) >= 1.0);
    assert_eq!(metric("wasmtap_log_records_total", &[("output", "syslog")]), FIRST as f64);
    assert!(daemon.log().matches("log output buffer full").count() == 1, "said once:\n{}", daemon.log());

    rsyslog.restart();
    wait_for(Duration::from_secs(30), "the held records to arrive", || (received().len() as u64 == FIRST + BUFFER).then_some(()));
    let got = numbers(&received(), |r| &r["rfc5424-sd"]["fields@32473"]["n"]);
    assert_eq!(got, (1..=FIRST + BUFFER).collect(), "the first records of the outage were held, in order, the later ones counted");
    assert_eq!(metric("wasmtap_log_records_total", &[("output", "syslog")]), (FIRST + BUFFER) as f64);
    assert_eq!(metric("wasmtap_log_buffered_records", &[("output", "syslog")]), 0.0);
}
