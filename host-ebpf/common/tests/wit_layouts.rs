//! Ties the record layouts `wit/wasmtap.wit` documents ("Offset N" per field, "Size: N
//! bytes" per record) to the Rust structs plugins and the host actually use, so the
//! contract's prose cannot drift from the code.

use std::{collections::BTreeMap, mem::offset_of};

use wasmtap_events::{ProcessRecord, Record, RecordHeader, SchedRecord, SyscallRecord, TcpRecord, UprobeRecord};

/// A record's layout: its size (none for the header, which has no stride of its own)
/// and its fields with their offsets.
type Layout<F> = (Option<usize>, Vec<(F, usize)>);

/// (record name in the WIT, layout) as Rust lays them out.
fn rust_layouts() -> Vec<(&'static str, Layout<&'static str>)> {
    macro_rules! fields {
        ($t:ty: $($field:ident),*) => { vec![$((stringify!($field), offset_of!($t, $field))),*] };
    }
    vec![
        ("record-header", (None, fields!(RecordHeader: ts_ns, cgroup_id, pid, tid, comm))),
        ("syscall-record", (Some(SyscallRecord::SIZE), fields!(SyscallRecord: header, latency_ns, ret, syscall_nr, reserved))),
        ("process-record", (Some(ProcessRecord::SIZE), fields!(ProcessRecord: header, event, ppid, uid, child_pid, exit_code, signal, lifetime_ns, filename))),
        ("sched-record", (Some(SchedRecord::SIZE), fields!(SchedRecord: header, wait_ns, reason, cpu))),
        (
            "tcp-record",
            (
                Some(TcpRecord::SIZE),
                fields!(TcpRecord: header, event, family, direction, local_port, remote_port, retransmits, duration_ns, bytes_sent, bytes_received, local_addr, remote_addr),
            ),
        ),
        ("uprobe-record", (Some(UprobeRecord::SIZE), fields!(UprobeRecord: header, probe, parent_pid, args, text_len, text_arg, text))),
    ]
}

/// What the WIT says: record → (documented size, field → documented offset).
fn documented(wit: &str) -> BTreeMap<String, Layout<String>> {
    let mut records = BTreeMap::new();
    let mut docs: Vec<&str> = Vec::new();
    let mut current: Option<(String, Layout<String>)> = None;
    for line in wit.lines().map(str::trim) {
        if let Some(doc) = line.strip_prefix("///") {
            docs.push(doc.trim());
            continue;
        }
        let number_after = |key: &str| docs.iter().find_map(|d| d.split(key).nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok());
        if let Some(name) = line.strip_prefix("record ").and_then(|l| l.strip_suffix(" {")) {
            current = Some((name.to_owned(), (number_after("Size: "), Vec::new())));
        } else if line == "}" {
            if let Some((name, layout)) = current.take()
                && !layout.1.is_empty()
            {
                records.insert(name, layout);
            }
        } else if let Some((_, (_, fields))) = &mut current
            && let Some((field, _)) = line.split_once(':')
            && let Some(offset) = number_after("Offset ")
        {
            fields.push((field.replace('-', "_"), offset));
        }
        docs.clear();
    }
    records
}

#[test]
fn every_documented_layout_matches_its_rust_struct() {
    let wit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../wit/wasmtap.wit")).expect("wit/wasmtap.wit");
    let documented = documented(&wit);
    let rust = rust_layouts();
    assert_eq!(
        documented.keys().collect::<Vec<_>>(),
        {
            let mut names: Vec<_> = rust.iter().map(|r| r.0).collect();
            names.sort();
            names
        },
        "documented layouts"
    );
    for (name, (size, fields)) in rust {
        let (doc_size, doc_fields) = &documented[name];
        assert_eq!(*doc_size, size, "{name}: documented size");
        let doc_fields: Vec<(&str, usize)> = doc_fields.iter().map(|(f, o)| (f.as_str(), *o)).collect();
        assert_eq!(doc_fields, fields, "{name}: documented fields and offsets");
    }
}

#[test]
fn the_frozen_0_2_0_layouts_are_prefixes_of_todays() {
    let frozen = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/compat-plugin/wit/wasmtap.wit")).expect("frozen WIT");
    let today = documented(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../wit/wasmtap.wit")).unwrap());
    for (name, (size, fields)) in documented(&frozen) {
        let (new_size, new_fields) = &today[&name];
        assert!(new_fields.starts_with(&fields), "{name}: fields may only be added at the end");
        assert!(size <= *new_size, "{name}: a layout never shrinks");
    }
    assert_eq!(documented(&frozen)["process-record"].0, Some(wasmtap_events::process::SIZE_0_2_0));
}
