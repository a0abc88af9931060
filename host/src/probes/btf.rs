//! Member offsets of kernel structs, from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`). Rust eBPF programs get no CO-RE relocations, so a kind
//! that reads kernel structs has the host look its offsets up here and write them into
//! the object's globals before loading. Only what that needs is parsed: the type table,
//! struct and union members, and the modifiers between a member and its type.

use anyhow::{Context as _, bail};

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

pub struct KernelBtf {
    data: Vec<u8>,
    strings: usize,
    /// Type id - 1 → (offset of its `btf_type` in `data`).
    types: Vec<usize>,
}

struct Type {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    size_or_type: u32,
    /// Where the kind-specific data (e.g. members) starts.
    extra: usize,
}

impl KernelBtf {
    pub fn load() -> anyhow::Result<Self> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).with_context(|| format!("cannot read {path}; this kernel lacks BTF (CONFIG_DEBUG_INFO_BTF)"))?;
        Self::parse(data).with_context(|| format!("cannot parse {path}"))
    }

    fn parse(data: Vec<u8>) -> anyhow::Result<Self> {
        let u32_at = |at: usize| data.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).context("truncated BTF");
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            bail!("not little-endian BTF");
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len, str_off) = (u32_at(8)? as usize, u32_at(12)? as usize, u32_at(16)? as usize);
        let (start, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
        let mut types = Vec::new();
        let mut at = start;
        while at < end {
            types.push(at);
            let info = u32_at(at + 4)?;
            let vlen = (info & 0xffff) as usize;
            let extra = match (info >> 24) & 0x1f {
                1 | 14 | 17 => 4,          // int, var, decl_tag
                3 => 12,                   // array
                4 | 5 | 15 => 12 * vlen,   // struct, union, datasec
                6 | 13 => 8 * vlen,        // enum, func_proto
                19 => 12 * vlen,           // enum64
                2 | 7..=12 | 16 | 18 => 0, // ptr, fwd, typedef, modifiers, func, float, type_tag
                kind => bail!("unknown BTF kind {kind}"),
            };
            at += 12 + extra;
        }
        Ok(Self { strings: hdr_len + str_off, data, types })
    }

    fn ty(&self, id: u32) -> Option<Type> {
        let at = *self.types.get((id as usize).checked_sub(1)?)?;
        let word = |i: usize| u32::from_le_bytes(self.data[at + 4 * i..at + 4 * i + 4].try_into().unwrap());
        let info = word(1);
        Some(Type {
            name_off: word(0),
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            size_or_type: word(2),
            extra: at + 12,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let start = self.strings + off as usize;
        let rest = self.data.get(start..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// The offsets the kernel objects' shared cgroup helpers read
    /// (`wasmtap_events::cgroup_offsets`).
    pub fn cgroup_offsets(&self) -> anyhow::Result<Vec<(&'static str, u32)>> {
        use wasmtap_events::cgroup_offsets as names;
        Ok(vec![
            (names::CGROUP_KN, self.member_offset("cgroup", &["kn"])?),
            (names::CGROUP_LEVEL, self.member_offset("cgroup", &["level"])?),
            (names::CGROUP_ANCESTORS, self.member_offset("cgroup", &["ancestors"])?),
            (names::KERNFS_NODE_ID, self.member_offset("kernfs_node", &["id"])?),
        ])
    }

    /// Byte offset of the first of `names` that `strukt` has (fields get renamed across
    /// kernel versions, so callers list the known spellings).
    pub fn member_offset(&self, strukt: &str, names: &[&str]) -> anyhow::Result<u32> {
        let id = (1..=self.types.len() as u32)
            .find(|&id| self.ty(id).is_some_and(|t| t.kind == KIND_STRUCT && t.vlen > 0 && self.name(t.name_off) == strukt.as_bytes()))
            .with_context(|| format!("the kernel's BTF has no struct {strukt}"))?;
        names
            .iter()
            .find_map(|name| self.find_member(id, name.as_bytes(), 0))
            .with_context(|| format!("struct {strukt} has none of the members {names:?} in this kernel's BTF"))
    }

    /// Searches `id`'s members, and the members of its anonymous struct/union members.
    fn find_member(&self, id: u32, name: &[u8], base_bits: u32) -> Option<u32> {
        let t = self.ty(id)?;
        if t.kind != KIND_STRUCT && t.kind != KIND_UNION {
            return None;
        }
        for i in 0..t.vlen {
            let at = t.extra + 12 * i;
            let word = |j: usize| u32::from_le_bytes(self.data[at + 4 * j..at + 4 * j + 4].try_into().unwrap());
            let (name_off, member_type, offset) = (word(0), word(1), word(2));
            let bits = base_bits + if t.kind_flag { offset & 0xff_ffff } else { offset };
            if name_off == 0 {
                if let Some(found) = self.find_member(self.resolve(member_type), name, bits) {
                    return Some(found);
                }
            } else if self.name(name_off) == name && bits.is_multiple_of(8) {
                return Some(bits / 8);
            }
        }
        None
    }

    /// Skips typedefs and modifiers.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.ty(id) {
                Some(t) if matches!(t.kind, KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG) => id = t.size_or_type,
                _ => break,
            }
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_task_struct_members_in_this_kernel() {
        let Ok(btf) = KernelBtf::load() else {
            eprintln!("SKIPPED: no readable /sys/kernel/btf/vmlinux on this machine");
            assert!(std::env::var_os("CI").is_none(), "CI machines have kernel BTF");
            return;
        };
        let pid = btf.member_offset("task_struct", &["pid"]).unwrap();
        let tgid = btf.member_offset("task_struct", &["tgid"]).unwrap();
        assert_eq!(tgid, pid + 4, "tgid follows pid");
        assert!(btf.member_offset("linux_binprm", &["filename"]).is_ok());
        assert!(btf.member_offset("task_struct", &["no_such_member"]).is_err());
    }
}
