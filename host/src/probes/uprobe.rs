//! The `uprobe` kind: probe points the plugins name (USDT probes, functions and
//! offsets in binaries, kernel functions where the kernel has kprobes). A point's
//! text is resolved to its sites when a subscription names it; the kind's one program
//! is attached at the sites of the points the subscriptions want, and detached when
//! none does. Records carry the point's id ([`probe_id`] of its text), which plugins
//! compute themselves.

mod perf;
mod point;

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::AsFd as _,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use aya::{Ebpf, maps::HashMap, programs::UProbe};
use wasmtap_events::{
    Record as _, UprobeRecord,
    uprobe::{MAX_SITES, PARENT_PID_OFFSET, SELECTOR_OFFSET, Site, names, probe_id},
};

use self::{perf::SiteLink, point::SiteTarget};
use super::{
    btf::KernelBtf,
    kind::{Flavour, Globals, KindSpec, Point},
};

pub static KIND: KindSpec = KindSpec {
    name: UprobeRecord::KIND,
    object: aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wasmtap-uprobe")),
    record_size: UprobeRecord::SIZE,
    selector_offset: SELECTOR_OFFSET,
    selector_param: "probes",
    parse_selector: |_| None,
    threshold: None,
    points: Some(intern),
    parent_pid_offset: Some(PARENT_PID_OFFSET),
    flavours: &[Flavour { name: "uprobe", programs: &[(PROGRAM, Point::PerSelector)] }],
    globals,
};

const PROGRAM: &str = "wt_uprobe";

/// Distinct points known at once (resolved and not yet forgotten); past it, points
/// nobody has attached are forgotten, and if all are attached a new one is refused.
pub const MAX_POINTS: usize = 1024;

fn globals(btf: Option<&KernelBtf>) -> anyhow::Result<Globals> {
    let btf = btf.ok_or_else(|| anyhow::anyhow!("the uprobe kind reads the parent's pid and needs the kernel's BTF (/sys/kernel/btf/vmlinux)"))?;
    Ok(vec![(names::TASK_TGID, btf.member_offset("task_struct", &["tgid"])?), (names::TASK_REAL_PARENT, btf.member_offset("task_struct", &["real_parent"])?)])
}

/// A resolved point: its text and its sites; `attached` while a probe has it attached.
struct Known {
    text: String,
    sites: Arc<Vec<SiteTarget>>,
    attached: bool,
}

/// Every point subscriptions named, by id.
static POINTS: Mutex<BTreeMap<u32, Known>> = Mutex::new(BTreeMap::new());

fn points() -> std::sync::MutexGuard<'static, BTreeMap<u32, Known>> {
    POINTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resolves the point `text` names (reading the binary) and returns its id.
fn intern(text: &str) -> anyhow::Result<u32> {
    let id = probe_id(text);
    if let Some(known) = points().get(&id) {
        anyhow::ensure!(known.text == text, "the probe points {:?} and {text:?} have the same id {id}; name one differently", known.text);
        return Ok(id);
    }
    let sites = point::resolve(text, id).with_context(|| format!("probe point {text:?}"))?;
    let mut points = points();
    if points.len() >= MAX_POINTS {
        points.retain(|_, known| known.attached);
        anyhow::ensure!(points.len() < MAX_POINTS, "{MAX_POINTS} probe points are attached; no more can be");
    }
    points.entry(id).or_insert(Known { text: text.to_owned(), sites: Arc::new(sites), attached: false });
    Ok(id)
}

/// The sites a probe has attached, by point id.
#[derive(Default)]
pub struct Points {
    links: BTreeMap<u32, Vec<(u64, SiteLink)>>,
    next_cookie: u64,
}

impl Points {
    fn sites(&self) -> usize {
        self.links.values().map(Vec::len).sum()
    }

    /// Attaches the program at the sites of the points in `wanted` it is not at yet,
    /// and detaches it from the others. A point that cannot be attached is reported
    /// (the others are attached all the same).
    pub fn sync(&mut self, ebpf: &mut Ebpf, wanted: &BTreeSet<u32>) -> anyhow::Result<()> {
        let program: &UProbe = ebpf.program(PROGRAM).context("object lacks the uprobe program")?.try_into()?;
        let program = program.fd()?.try_clone()?;
        let mut sites: HashMap<_, u64, Site> = HashMap::try_from(ebpf.map_mut(names::SITES).context("object lacks SITES")?)?;
        let mut known = points();
        let gone: Vec<u32> = self.links.keys().filter(|id| !wanted.contains(id)).copied().collect();
        for id in gone {
            for (cookie, link) in self.links.remove(&id).unwrap_or_default() {
                drop(link);
                let _ = sites.remove(&cookie);
            }
            if let Some(point) = known.get_mut(&id) {
                point.attached = false;
            }
        }
        let mut errors = Vec::new();
        let new: Vec<u32> = wanted.iter().filter(|id| !self.links.contains_key(id)).copied().collect();
        for id in new {
            let Some(point) = known.get_mut(&id) else {
                errors.push(format!("probe point {id} is no longer known (more than {MAX_POINTS} were named); reload its plugin"));
                continue;
            };
            if self.sites() + point.sites.len() > MAX_SITES as usize {
                errors.push(format!("{:?} has {} sites; with those attached that is more than {MAX_SITES}", point.text, point.sites.len()));
                continue;
            }
            let mut links = Vec::new();
            let attached = point.sites.iter().try_for_each(|target| {
                let cookie = self.next_cookie;
                self.next_cookie += 1;
                sites.insert(cookie, target.site, 0).context("writing SITES")?;
                links.push((cookie, perf::attach(program.as_fd(), &target.pmu, target.retprobe, cookie)?));
                Ok::<_, anyhow::Error>(())
            });
            match attached {
                Ok(()) => {
                    point.attached = true;
                    tracing::info!(point = point.text, sites = links.len(), "probe point attached");
                    self.links.insert(id, links);
                }
                Err(e) => {
                    for (cookie, link) in links {
                        drop(link);
                        let _ = sites.remove(&cookie);
                    }
                    let _ = sites.remove(&(self.next_cookie - 1));
                    errors.push(format!("cannot attach {:?}: {e:#}", point.text));
                }
            }
        }
        match errors.is_empty() {
            true => Ok(()),
            false => Err(anyhow::anyhow!(errors.join("; "))),
        }
    }
}

impl Drop for Points {
    fn drop(&mut self) {
        let mut known = points();
        for id in self.links.keys() {
            if let Some(point) = known.get_mut(id) {
                point.attached = false;
            }
        }
    }
}
