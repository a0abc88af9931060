//! Recording batches: the [`Recorder`] observes every batch the router hands out (in
//! the daemon, `wasmtap run --record FILE`: exactly the batches its plugins get), and
//! `wasmtap record` attaches the probes of the kinds asked for, with the filters given
//! (in the kernel, as a plugin's would be), and records until the duration is up or
//! SIGINT/SIGTERM.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc::{SyncSender, sync_channel},
    },
    time::Duration,
};

use anyhow::Context as _;

use super::Writer;
use crate::{
    config::ProbeSettings,
    enrich::Enricher,
    events::{Batch, Router, Subscriber, route::Observer},
    probes::{self, Kind, attached::Attached},
    sinks::SelfMetrics,
};

/// What to record.
pub struct Options {
    pub out: PathBuf,
    pub duration: Option<Duration>,
    /// Kind names (default: every kind that needs no probe points).
    pub kinds: Vec<String>,
    pub pids: Vec<u32>,
    pub cgroups: Vec<u64>,
    pub comms: Vec<String>,
    /// A kind's filter parameters, `KIND:PARAM=V1,V2` (e.g. `syscall:syscalls=read,write`,
    /// `uprobe:probes=usdt:/bin/x:p:n`).
    pub params: Vec<String>,
    pub max_bytes: u64,
}

/// What was recorded.
#[derive(Debug)]
pub struct Summary {
    pub records: Vec<(&'static str, u64)>,
    pub dropped: u64,
    pub bytes: u64,
}

/// Batches, and bytes of them, waiting for the writer.
const QUEUE_BATCHES: usize = 1024;
const QUEUE_BYTES: u64 = 64 << 20;

/// Writes every batch the router sees to a recording, off the reader's thread: a
/// batch that finds the queue full, or the file at `max_bytes`, is counted as dropped
/// (and the next frame of its kind says how many).
pub struct Recorder {
    queue: Mutex<Option<SyncSender<Batch>>>,
    /// Records of each kind dropped since its last frame.
    pending: Arc<Vec<(Kind, AtomicU64)>>,
    /// Bytes of the batches queued for the writer.
    queued: Arc<AtomicU64>,
    writing: Mutex<Option<std::thread::JoinHandle<anyhow::Result<Summary>>>>,
}

impl Recorder {
    /// Creates `path` for batches of `kinds` and starts the writer.
    pub fn start(path: &Path, kinds: &[Kind], max_bytes: u64) -> anyhow::Result<Arc<Self>> {
        let node = crate::config::LogSettings::default().node();
        let mut writer = Writer::create(path, kinds, &node)?;
        let pending: Arc<Vec<(Kind, AtomicU64)>> = Arc::new(kinds.iter().map(|&k| (k, AtomicU64::new(0))).collect());
        let (queue, batches) = sync_channel::<Batch>(QUEUE_BATCHES);
        let (counts, queued) = (pending.clone(), Arc::new(AtomicU64::new(0)));
        let written = queued.clone();
        let writing = std::thread::Builder::new().name("wasmtap-record".into()).spawn(move || -> anyhow::Result<Summary> {
            let mut records: Vec<(&'static str, u64)> = counts.iter().map(|(k, _)| (k.name, 0)).collect();
            let mut dropped = 0;
            for batch in batches {
                written.fetch_sub(batch.records.len() as u64, Relaxed);
                let Some(i) = counts.iter().position(|(k, _)| *k == batch.kind) else { continue };
                let before = counts[i].1.swap(0, Relaxed);
                if writer.bytes() + batch.records.len() as u64 > max_bytes {
                    // Counted once, at the end, with the kind's other pending drops.
                    counts[i].1.fetch_add(before + batch.len() as u64, Relaxed);
                    continue;
                }
                dropped += before;
                if let Err(e) = writer.write(batch.kind, &batch.records, before) {
                    tracing::error!("the recording stops here, batches are counted as dropped from now on: {e:#}");
                    return Err(e);
                }
                records[i].1 += batch.len() as u64;
            }
            dropped += counts.iter().map(|(_, n)| n.load(Relaxed)).sum::<u64>();
            let bytes = writer.bytes();
            writer.finish()?;
            Ok(Summary { records, dropped, bytes })
        })?;
        Ok(Arc::new(Self { queue: Mutex::new(Some(queue)), pending, queued, writing: Mutex::new(Some(writing)) }))
    }

    /// Ends the recording (batches observed later are not kept) and says what it has.
    pub fn finish(&self) -> anyhow::Result<Summary> {
        drop(self.queue.lock().expect("recorder").take());
        let writing = self.writing.lock().expect("recorder").take().context("the recording was already finished")?;
        writing.join().map_err(|_| anyhow::anyhow!("the recording writer panicked"))?
    }
}

impl Observer for Recorder {
    fn observe(&self, batch: &Batch) {
        let Some((_, pending)) = self.pending.iter().find(|(k, _)| *k == batch.kind) else { return };
        let bytes = batch.records.len() as u64;
        let room = self.queued.fetch_add(bytes, Relaxed) + bytes <= QUEUE_BYTES;
        let sent = room && self.queue.lock().expect("recorder").as_ref().is_some_and(|q| q.try_send(batch.clone()).is_ok());
        if !sent {
            self.queued.fetch_sub(bytes, Relaxed);
            pending.fetch_add(batch.len() as u64, Relaxed);
        }
    }

    fn lost(&self, _kind: Kind) {}
}

/// `wasmtap record`: attaches the kinds of `options` with its filters and records
/// until the duration is up or SIGINT/SIGTERM.
pub fn record(options: &Options) -> anyhow::Result<Summary> {
    let kinds = kinds(options)?;
    let metrics = SelfMetrics::default();
    // Subscribers only to program the kernel filters: the recorder observes the batches.
    let (unused, _) = sync_channel(1);
    let mut subscribers = Vec::new();
    for &kind in &kinds {
        let params = params_for(options, kind)?;
        let filter = kind.parse_filter(&options.pids, &options.cgroups, &options.comms, &params).with_context(|| format!("the {} filter", kind.name))?;
        subscribers.push(Arc::new(Subscriber::new("record", kind, vec![filter], None, unused.clone(), metrics.plugin("record"))));
    }
    let recorder = Recorder::start(&options.out, &kinds, options.max_bytes)?;
    let router = Arc::new(Router::default());
    router.set(Vec::new(), vec![recorder.clone() as Arc<dyn Observer>]);
    let mut attached = Attached::new(ProbeSettings::default(), router.clone(), metrics, Arc::new(Enricher::new()))?;
    attached.sync(&subscribers, false);
    let (_, errors) = attached.status();
    if !errors.is_empty() {
        attached.shutdown();
        let _ = recorder.finish();
        let _ = std::fs::remove_file(&options.out);
        let errors: Vec<String> = errors.iter().map(|(kind, e)| format!("{kind}: {e}")).collect();
        anyhow::bail!("probes not attached:\n  {}", errors.join("\n  "));
    }
    eprintln!("recording {} to {} (Ctrl-C stops)", kinds.iter().map(|k| k.name).collect::<Vec<_>>().join(", "), options.out.display());
    wait(options.duration)?;
    attached.shutdown(); // detaches, then drains what the kernel wrote
    recorder.finish()
}

fn kinds(options: &Options) -> anyhow::Result<Vec<Kind>> {
    if options.kinds.is_empty() {
        return Ok(probes::KINDS.iter().copied().filter(|k| !k.attaches_points()).collect());
    }
    options
        .kinds
        .iter()
        .map(|name| {
            probes::kind(name)
                .with_context(|| format!("unknown kind {name:?}; this host offers {}", probes::KINDS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")))
        })
        .collect()
}

/// The `--param KIND:NAME=V1,V2` values for `kind`.
fn params_for(options: &Options, kind: Kind) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let mut params = Vec::new();
    for param in &options.params {
        let (of, rest) = param.split_once(':').with_context(|| format!("--param {param:?} is not KIND:NAME=VALUES"))?;
        let (name, values) = rest.split_once('=').with_context(|| format!("--param {param:?} is not KIND:NAME=VALUES"))?;
        if of == kind.name {
            params.push((name.to_owned(), values.split(',').map(str::to_owned).collect()));
        }
    }
    Ok(params)
}

/// Until `duration` passes or SIGINT/SIGTERM.
fn wait(duration: Option<Duration>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let until = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = until => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
        Ok(())
    })
}
