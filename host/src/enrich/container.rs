//! What a cgroup path says about containers: the container id (docker, containerd/CRI,
//! CRI-O and podman layouts, with the systemd and the cgroupfs drivers) and the
//! Kubernetes pod uid.
//!
//! Examples:
//! - `/system.slice/docker-<64 hex>.scope`, `/docker/<64 hex>`
//! - `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice/cri-containerd-<64 hex>.scope`
//! - `/kubepods/besteffort/pod<uid>/<64 hex>`
//! - `/kubepods.slice/.../crio-<64 hex>.scope`
//! - `/machine.slice/libpod-<64 hex>.scope/container`

/// Prefixes a runtime puts before the id in a systemd scope name.
const SCOPE_PREFIXES: &[&str] = &["docker-", "cri-containerd-", "crio-", "libpod-", "containerd-"];

/// The container id in `path`: the last component that is (or, with a runtime's scope
/// prefix and `.scope` suffix, contains) 64 hex digits.
pub fn container_id(path: &str) -> Option<String> {
    path.split('/').rev().find_map(|component| {
        let id = component.strip_suffix(".scope").map_or(component, |scoped| SCOPE_PREFIXES.iter().find_map(|p| scoped.strip_prefix(p)).unwrap_or(scoped));
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
    })
}

/// The pod uid in `path`: `pod<uid>` (cgroupfs driver) or `...-pod<uid with _>.slice`
/// (systemd driver), returned in its usual dashed form.
pub fn pod_uid(path: &str) -> Option<String> {
    path.split('/').rev().find_map(|component| {
        let name = component.strip_suffix(".slice").unwrap_or(component);
        let at = name.rfind("pod")?;
        if at > 0 && !name[..at].ends_with('-') {
            return None;
        }
        let uid = name[at + 3..].replace('_', "-");
        let is_uuid = uid.len() == 36 && uid.char_indices().all(|(i, c)| if matches!(i, 8 | 13 | 18 | 23) { c == '-' } else { c.is_ascii_hexdigit() });
        is_uuid.then_some(uid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";
    const POD: &str = "0d2e3f4a-5b6c-7d8e-9f00-112233445566";

    #[test]
    fn finds_container_ids_of_every_runtime_layout() {
        for path in [
            format!("/system.slice/docker-{ID}.scope"),
            format!("/docker/{ID}"),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope", POD.replace('-', "_")),
            format!("/kubepods/besteffort/pod{POD}/{ID}"),
            format!("/kubepods.slice/kubepods-pod{}.slice/crio-{ID}.scope", POD.replace('-', "_")),
            format!("/machine.slice/libpod-{ID}.scope/container"),
        ] {
            assert_eq!(container_id(&path).as_deref(), Some(ID), "{path}");
        }
        for path in ["/", "/user.slice/user-1000.slice/session-2.scope", "/system.slice/docker.service", "/docker/abc"] {
            assert_eq!(container_id(path), None, "{path}");
        }
    }

    #[test]
    fn finds_pod_uids_of_both_drivers() {
        assert_eq!(pod_uid(&format!("/kubepods/besteffort/pod{POD}/{ID}")).as_deref(), Some(POD));
        let systemd = format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope", POD.replace('-', "_"));
        assert_eq!(pod_uid(&systemd).as_deref(), Some(POD));
        assert_eq!(pod_uid(&format!("/system.slice/docker-{ID}.scope")), None);
        assert_eq!(pod_uid("/kubepods/podnot-a-uid"), None);
    }
}
