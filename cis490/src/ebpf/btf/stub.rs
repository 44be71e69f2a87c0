//! The BTF aya is given to load the programs: a stub with the kernel's own
//! type ids for the attach points, instead of the whole kernel BTF.
//!
//! aya needs kernel BTF only to find an attach point's type id by name
//! (`btf_trace_<tracepoint>` for a `tp_btf` program, `bpf_iter_<what>` for
//! an iterator): the objects carry no CO-RE relocations (Rust emits none;
//! a unit test checks). Parsing the whole kernel BTF with aya took about 30
//! MiB at its peak here, the largest allocation the tracer ever made; this
//! stub (every other id a placeholder `void *`) takes well under a tenth.

use std::collections::BTreeMap;

use super::{
    BTF_MAGIC, BTF_VERSION, HEADER_MIN_LEN, ITERATOR_FUNC_PREFIX, TRACEPOINT_TYPEDEF_PREFIX, kind,
};

const KIND_PTR: u32 = kind::PTR as u32;
const KIND_TYPEDEF: u32 = kind::TYPEDEF as u32;
const KIND_FUNC: u32 = kind::FUNC as u32;

/// A BTF blob where `btf_trace_<name>` (a TYPEDEF) and `bpf_iter_<what>`
/// (a FUNC) have the type ids they have in the kernel, and every other id
/// up to the largest of them is an unnamed pointer to void.
pub fn stub(tracepoints: &BTreeMap<String, u32>, iterators: &BTreeMap<String, u32>) -> Vec<u8> {
    let mut strings = vec![0u8];
    let mut named: BTreeMap<u32, (u32, u32)> = BTreeMap::new();
    let name = |prefix: &str, n: &str, strings: &mut Vec<u8>| {
        let off = strings.len() as u32;
        strings.extend_from_slice(prefix.as_bytes());
        strings.extend_from_slice(n.as_bytes());
        strings.push(0);
        off
    };
    for (tp, &id) in tracepoints {
        named.insert(
            id,
            (
                KIND_TYPEDEF,
                name(TRACEPOINT_TYPEDEF_PREFIX, tp, &mut strings),
            ),
        );
    }
    for (what, &id) in iterators {
        named.insert(
            id,
            (KIND_FUNC, name(ITERATOR_FUNC_PREFIX, what, &mut strings)),
        );
    }
    let max_id = named.keys().next_back().copied().unwrap_or(0);
    let mut types = Vec::with_capacity(max_id as usize * 12);
    for id in 1..=max_id {
        let (kind, name_off) = named.get(&id).copied().unwrap_or((KIND_PTR, 0));
        types.extend_from_slice(&name_off.to_ne_bytes());
        types.extend_from_slice(&(kind << 24).to_ne_bytes());
        // size_or_type: void.
        types.extend_from_slice(&0u32.to_ne_bytes());
    }
    let mut blob = Vec::with_capacity(HEADER_MIN_LEN + types.len() + strings.len());
    blob.extend_from_slice(&BTF_MAGIC.to_ne_bytes());
    blob.push(BTF_VERSION);
    blob.push(0); // flags
    blob.extend_from_slice(&(HEADER_MIN_LEN as u32).to_ne_bytes()); // hdr_len
    blob.extend_from_slice(&0u32.to_ne_bytes()); // type_off
    blob.extend_from_slice(&(types.len() as u32).to_ne_bytes());
    blob.extend_from_slice(&(types.len() as u32).to_ne_bytes()); // str_off
    blob.extend_from_slice(&(strings.len() as u32).to_ne_bytes());
    blob.extend_from_slice(&types);
    blob.extend_from_slice(&strings);
    blob
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya_obj::btf::BtfKind;

    #[test]
    fn stub_gives_the_kernel_ids() {
        let tps = BTreeMap::from([
            ("sched_switch".to_owned(), 7u32),
            ("sched_wakeup".to_owned(), 3),
        ]);
        let its = BTreeMap::from([("task".to_owned(), 5u32)]);
        let blob = stub(&tps, &its);
        let btf = aya::Btf::parse(&blob, aya::Endianness::default()).unwrap();
        assert_eq!(
            btf.id_by_type_name_kind("btf_trace_sched_switch", BtfKind::Typedef)
                .unwrap(),
            7
        );
        assert_eq!(
            btf.id_by_type_name_kind("btf_trace_sched_wakeup", BtfKind::Typedef)
                .unwrap(),
            3
        );
        assert_eq!(
            btf.id_by_type_name_kind("bpf_iter_task", BtfKind::Func)
                .unwrap(),
            5
        );
        assert!(
            btf.id_by_type_name_kind("btf_trace_nope", BtfKind::Typedef)
                .is_err()
        );
    }

    /// The stub is enough only because the object has no CO-RE relocations
    /// (they would need the whole kernel BTF): `.BTF.ext`'s `core_relo_len`
    /// is 0, or there is no such section.
    #[test]
    fn the_ebpf_object_has_no_core_relocations() {
        use object::{Object as _, ObjectSection as _};
        let obj = object::File::parse(crate::ebpf::loader::EBPF_OBJECT).unwrap();
        let Some(ext) = obj.section_by_name(".BTF.ext") else {
            return;
        };
        let data = ext.data().unwrap();
        // struct btf_ext_header { u16 magic; u8 version, flags; u32 hdr_len;
        //   u32 func_info_off, func_info_len, line_info_off, line_info_len;
        //   u32 core_relo_off, core_relo_len; }
        let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
        let hdr_len = u32_at(4) as usize;
        if hdr_len >= 32 {
            assert_eq!(u32_at(28), 0, "the eBPF object has CO-RE relocations");
        }
    }
}
