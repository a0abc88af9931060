//! The `uprobe` kind: probe points the plugins name (USDT probes, functions and
//! offsets in binaries, kernel functions where the kernel has kprobes). A point's
//! text is resolved to its sites when a subscription names it; the kind's one program
//! is attached at the sites of the points the subscriptions want, and detached when
//! none does. Records carry the point's id ([`probe_id`] of its text), which plugins
//! compute themselves.

mod perf;
mod point;

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    ffi::CString,
    os::fd::{AsFd as _, AsRawFd as _},
    sync::Mutex,
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{ProgramFd, UProbe},
};
use wasmtap_events::{
    Record as _, UprobeRecord,
    uprobe::{MAX_SITES, PARENT_PID_OFFSET, SELECTOR_OFFSET, Site, names, probe_id},
};

use self::{
    perf::SiteLink,
    point::{FileId, Resolved},
};
use super::{
    btf::KernelBtf,
    kind::{Flavour, Globals, KindSpec, Point, Selectors},
};

pub static KIND: KindSpec = KindSpec {
    name: UprobeRecord::KIND,
    object: aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wasmtap-uprobe")),
    record_size: UprobeRecord::SIZE,
    selector_offset: SELECTOR_OFFSET,
    selector_param: "probes",
    selectors: Selectors::Points(intern),
    threshold: None,
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

/// A resolved point: its text, its sites and the binary they are in; `attached` while
/// a probe has it attached.
struct Known {
    text: String,
    resolved: Resolved,
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
    let resolved = point::resolve(text, id).with_context(|| format!("probe point {text:?}"))?;
    let mut points = points();
    if points.len() >= MAX_POINTS {
        points.retain(|_, known| known.attached);
        anyhow::ensure!(points.len() < MAX_POINTS, "{MAX_POINTS} probe points are attached; no more can be");
    }
    match points.entry(id) {
        Entry::Occupied(known) => {
            anyhow::ensure!(known.get().text == text, "the probe points {:?} and {text:?} have the same id {id}; name one differently", known.get().text)
        }
        Entry::Vacant(slot) => drop(slot.insert(Known { text: text.to_owned(), resolved, attached: false })),
    }
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
            let mut links = Vec::new();
            let attached = self.attach(&program, &mut sites, point, &mut links);
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
                    errors.push(format!("cannot attach {:?}: {e:#}", point.text));
                }
            }
        }
        match errors.is_empty() {
            true => Ok(()),
            false => Err(anyhow::anyhow!(errors.join("; "))),
        }
    }

    /// Attaches `point`'s sites, pushing each link (and its cookie, in `SITES`) to
    /// `links`. The binary is opened once and attached through that open file, so the
    /// sites attached are in the file they were found in: a binary replaced since is
    /// resolved again first.
    fn attach(
        &mut self,
        program: &ProgramFd,
        sites: &mut HashMap<&mut MapData, u64, Site>,
        point: &mut Known,
        links: &mut Vec<(u64, SiteLink)>,
    ) -> anyhow::Result<()> {
        let binary = match point.resolved.binary.clone() {
            Some((path, id)) => {
                let file = std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
                if FileId::of(&file.metadata()?) != id {
                    tracing::info!(point = point.text, "the binary changed since the point was resolved; resolving it again");
                    point.resolved = point::resolve(&point.text, probe_id(&point.text))?;
                    let now = point.resolved.binary.as_ref().map(|(_, id)| *id);
                    anyhow::ensure!(now == Some(FileId::of(&file.metadata()?)), "{path} changed while it was read; try again");
                }
                Some((CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?, file))
            }
            None => None,
        };
        let count = point.resolved.sites.len();
        anyhow::ensure!(self.sites() + count <= MAX_SITES as usize, "{count} sites, with those attached more than {MAX_SITES}");
        for target in &point.resolved.sites {
            let cookie = self.next_cookie;
            self.next_cookie += 1;
            sites.insert(cookie, target.site, 0).context("writing SITES")?;
            let link = perf::attach(program.as_fd(), &target.pmu(binary.as_ref().map(|(path, _)| path.as_c_str()))?, target.retprobe, cookie);
            match link {
                Ok(link) => links.push((cookie, link)),
                Err(e) => {
                    let _ = sites.remove(&cookie);
                    return Err(e);
                }
            }
        }
        Ok(())
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
