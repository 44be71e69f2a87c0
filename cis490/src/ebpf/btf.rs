//! Minimal reader for the kernel's raw BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The eBPF programs are written in Rust, which has no CO-RE field
//! relocations, so the loader resolves the few struct member offsets the
//! programs need (e.g. `task_struct.pid`) from the running kernel's BTF at
//! start-up, and checks that the BTF-enabled tracepoints the programs attach
//! to exist (tracepoint `foo` exists when the BTF has a typedef named
//! `btf_trace_foo`).
//!
//! Format: <https://docs.kernel.org/bpf/btf.html>. A blob is a header
//! (`struct btf_header`), then a type section of `struct btf_type` records
//! (12 bytes each, followed by kind-specific data) and a string section of
//! NUL-terminated names. Type ids are implicit: the first record is id 1
//! (id 0 is `void`). Both byte orders are accepted; the magic `0xeB9F` tells
//! which one the blob uses.
//!
//! Parsing validates every bound it relies on and never panics on malformed
//! input: it returns an error instead.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail, ensure};

const BTF_MAGIC: u16 = 0xEB9F;
const BTF_VERSION: u8 = 1;
/// Size of the version-1 `struct btf_header` (a longer `hdr_len` is allowed).
const HEADER_MIN_LEN: usize = 24;
/// Size of `struct btf_type` (name_off, info, size/type).
const TYPE_HEADER_LEN: usize = 12;
/// Limit on nested anonymous struct/union members followed by
/// [`KernelBtf::member_offset`]; protects against cyclic (corrupt) BTF.
const MAX_ANON_DEPTH: usize = 64;
/// Prefix of the typedef the kernel emits for each BTF-enabled tracepoint.
const TRACEPOINT_TYPEDEF_PREFIX: &str = "btf_trace_";
/// Prefix of the function the kernel emits for each BPF iterator target.
const ITERATOR_FUNC_PREFIX: &str = "bpf_iter_";

/// The BTF aya loads the programs with (only the attach points' ids).
pub mod stub;

/// BTF kinds (`BTF_KIND_*` in `include/uapi/linux/btf.h`).
mod kind {
    pub const INT: u8 = 1;
    pub const PTR: u8 = 2;
    pub const ARRAY: u8 = 3;
    pub const STRUCT: u8 = 4;
    pub const UNION: u8 = 5;
    pub const ENUM: u8 = 6;
    pub const FWD: u8 = 7;
    pub const TYPEDEF: u8 = 8;
    pub const VOLATILE: u8 = 9;
    pub const CONST: u8 = 10;
    pub const RESTRICT: u8 = 11;
    pub const FUNC: u8 = 12;
    pub const FUNC_PROTO: u8 = 13;
    pub const VAR: u8 = 14;
    pub const DATASEC: u8 = 15;
    pub const FLOAT: u8 = 16;
    pub const DECL_TAG: u8 = 17;
    pub const TYPE_TAG: u8 = 18;
    pub const ENUM64: u8 = 19;

    pub fn name(kind: u8) -> &'static str {
        match kind {
            0 => "UNKN",
            INT => "INT",
            PTR => "PTR",
            ARRAY => "ARRAY",
            STRUCT => "STRUCT",
            UNION => "UNION",
            ENUM => "ENUM",
            FWD => "FWD",
            TYPEDEF => "TYPEDEF",
            VOLATILE => "VOLATILE",
            CONST => "CONST",
            RESTRICT => "RESTRICT",
            FUNC => "FUNC",
            FUNC_PROTO => "FUNC_PROTO",
            VAR => "VAR",
            DATASEC => "DATASEC",
            FLOAT => "FLOAT",
            DECL_TAG => "DECL_TAG",
            TYPE_TAG => "TYPE_TAG",
            ENUM64 => "ENUM64",
            _ => "unknown",
        }
    }
}

/// One `struct btf_type`, with what the lookups need of its trailing data.
#[derive(Clone, Copy, Debug)]
struct BtfType {
    kind: u8,
    kind_flag: bool,
    name_off: u32,
    /// `size` for INT/STRUCT/UNION/ENUM/DATASEC/FLOAT/ENUM64, else `type`.
    size_or_type: u32,
    /// STRUCT/UNION only: index of the first member in `KernelBtf::members`.
    first_member: u32,
    /// STRUCT/UNION only: number of members (0 for the other kinds).
    member_count: u16,
}

/// One `struct btf_member`.
#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Bit offset; with the parent's `kind_flag` set, bitfield size in the
    /// top 8 bits and bit offset in the low 24 bits.
    offset: u32,
}

/// Where a member was found, relative to the start of the outer struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Location {
    bit_offset: u64,
    /// Bitfield size in bits, when the encoding says (kind_flag structs).
    bitfield_size: u32,
    /// The member's type.
    type_id: u32,
}

/// Parsed kernel BTF: the type table, the string section and a name index.
pub struct KernelBtf {
    /// Indexed by type id; entry 0 stands for `void`.
    types: Vec<BtfType>,
    /// Members of all STRUCT/UNION types, in type order.
    members: Vec<Member>,
    /// The string section (starts and ends with a NUL byte).
    strings: Vec<u8>,
    /// Names of STRUCT, UNION and TYPEDEF types to their type ids.
    by_name: HashMap<Box<str>, Vec<u32>>,
}

impl fmt::Debug for KernelBtf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelBtf")
            .field("types", &(self.types.len() - 1))
            .field("members", &self.members.len())
            .field("string_bytes", &self.strings.len())
            .field("indexed_names", &self.by_name.len())
            .finish()
    }
}

/// Reads integers of the blob's byte order.
#[derive(Clone, Copy)]
struct Reader<'a> {
    bytes: &'a [u8],
    big_endian: bool,
}

impl Reader<'_> {
    fn u32_at(&self, pos: usize) -> Option<u32> {
        let raw: [u8; 4] = self.bytes.get(pos..pos.checked_add(4)?)?.try_into().ok()?;
        Some(if self.big_endian {
            u32::from_be_bytes(raw)
        } else {
            u32::from_le_bytes(raw)
        })
    }
}

impl KernelBtf {
    /// Reads and parses the raw BTF at `path` (normally `/sys/kernel/btf/vmlinux`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "kernel BTF not found at {}: the running kernel must be built with \
                 CONFIG_DEBUG_INFO_BTF=y (it provides /sys/kernel/btf/vmlinux, needed to \
                 resolve struct offsets and BTF tracepoints)",
                path.display()
            ),
            Err(e) => {
                return Err(anyhow!(e).context(format!(
                    "cannot read kernel BTF at {} (a kernel built with CONFIG_DEBUG_INFO_BTF=y \
                     provides it)",
                    path.display()
                )));
            }
        };
        Self::parse(&bytes).with_context(|| format!("invalid BTF in {}", path.display()))
    }

    /// Parses a raw BTF blob: validates the header (magic `0xeB9F`,
    /// version 1, section bounds) and every type record. Never panics on bad
    /// input.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        ensure!(
            bytes.len() >= HEADER_MIN_LEN,
            "BTF blob too short: {} bytes, the header alone is {HEADER_MIN_LEN}",
            bytes.len()
        );
        let magic = [bytes[0], bytes[1]];
        let big_endian = if magic == BTF_MAGIC.to_le_bytes() {
            false
        } else if magic == BTF_MAGIC.to_be_bytes() {
            true
        } else {
            bail!(
                "not BTF: bad magic {:#06x} (expected {BTF_MAGIC:#06x})",
                u16::from_le_bytes(magic)
            );
        };
        let version = bytes[2];
        ensure!(
            version == BTF_VERSION,
            "unsupported BTF version {version} (expected {BTF_VERSION})"
        );
        let r = Reader { bytes, big_endian };
        // `bytes.len() >= 24`, so these header fields are all present.
        let field = |pos: usize| r.u32_at(pos).unwrap_or(0) as usize;
        let hdr_len = field(4);
        let (type_off, type_len) = (field(8), field(12));
        let (str_off, str_len) = (field(16), field(20));
        ensure!(
            (HEADER_MIN_LEN..=bytes.len()).contains(&hdr_len),
            "bad BTF header length {hdr_len} (blob is {} bytes, minimum header {HEADER_MIN_LEN})",
            bytes.len()
        );
        let data = &bytes[hdr_len..];
        let section = |what: &str, off: usize, len: usize| -> Result<&[u8]> {
            off.checked_add(len)
                .and_then(|end| data.get(off..end))
                .ok_or_else(|| {
                    anyhow!(
                        "BTF {what} section (offset {off}, length {len}) runs past the end of \
                         the data ({} bytes after the header): truncated blob?",
                        data.len()
                    )
                })
        };
        let type_sec = section("type", type_off, type_len)?;
        let str_sec = section("string", str_off, str_len)?;
        ensure!(
            type_off % 4 == 0,
            "BTF type section offset {type_off} is not 4-byte aligned"
        );
        ensure!(
            str_sec.first() == Some(&0) && str_sec.last() == Some(&0),
            "BTF string section must start and end with a NUL byte"
        );

        let (types, members) = parse_types(Reader {
            bytes: type_sec,
            big_endian,
        })?;
        let strings = str_sec.to_vec();

        let mut by_name: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        for (id, t) in types.iter().enumerate().skip(1) {
            if !matches!(t.kind, kind::STRUCT | kind::UNION | kind::TYPEDEF) {
                continue;
            }
            let Some(name) = str_at(&strings, t.name_off).filter(|n| !n.is_empty()) else {
                continue;
            };
            // `types.len()` fits in u32: see `parse_types`.
            let id = id as u32;
            match by_name.get_mut(name) {
                Some(ids) => ids.push(id),
                None => {
                    by_name.insert(name.into(), vec![id]);
                }
            }
        }

        Ok(Self {
            types,
            members,
            strings,
            by_name,
        })
    }

    /// Byte offset of `member` in `struct struct_name` (a union of that name
    /// is accepted too), searching through anonymous struct/union members
    /// (adding their offsets). The error names the struct and the member.
    ///
    /// A bitfield member is accepted only when it starts on a byte boundary
    /// (the offset of its first byte is returned).
    #[cfg(test)]
    pub fn member_offset(&self, struct_name: &str, member: &str) -> Result<u32> {
        let loc = self.locate(struct_name, member)?;
        byte_offset(&loc, struct_name, member)
    }

    /// Byte offset of a dotted member path in `struct struct_name`, e.g.
    /// `("task_struct", "se.sum_exec_runtime")`: each step but the last must
    /// be a struct or union member (anonymous members are searched as in
    /// [`Self::member_offset`]).
    pub fn member_path_offset(&self, struct_name: &str, path: &str) -> Result<u32> {
        let mut parts = path.split('.');
        let first = parts
            .next()
            .filter(|p| !p.is_empty())
            .context("empty member path")?;
        let mut loc = self.locate(struct_name, first)?;
        let mut walked = format!("{struct_name}.{first}");
        for part in parts {
            let inner = self
                .skip_modifiers(loc.type_id)
                .filter(|&i| {
                    self.ty(i)
                        .is_some_and(|t| matches!(t.kind, kind::STRUCT | kind::UNION))
                })
                .with_context(|| format!("`{walked}` in kernel BTF is not a struct or union"))?;
            loc = self
                .find_member(inner, part, loc.bit_offset, 0)?
                .with_context(|| format!("`{walked}` in kernel BTF has no member `{part}`"))?;
            walked = format!("{walked}.{part}");
        }
        byte_offset(&loc, struct_name, path)
    }

    /// Where `member` is in `struct struct_name` (see `member_offset`).
    fn locate(&self, struct_name: &str, member: &str) -> Result<Location> {
        let candidates: Vec<u32> = self
            .ids_named(struct_name)
            .iter()
            .copied()
            .filter(|&id| {
                matches!(
                    self.ty(id).map(|t| t.kind),
                    Some(kind::STRUCT | kind::UNION)
                )
            })
            .collect();
        ensure!(
            !candidates.is_empty(),
            "kernel BTF has no struct `{struct_name}` (looking for its member `{member}`)"
        );

        // The kernel's BTF is deduplicated, so a name normally has one
        // definition; if there are several, they must agree.
        let mut found: Option<(u32, Location)> = None;
        for id in candidates {
            let Some(loc) = self
                .find_member(id, member, 0, 0)
                .with_context(|| format!("looking for `{struct_name}.{member}` in kernel BTF"))?
            else {
                continue;
            };
            match found {
                None => found = Some((id, loc)),
                Some((first_id, first)) if first.bit_offset != loc.bit_offset => bail!(
                    "kernel BTF has conflicting definitions of struct `{struct_name}`: member \
                     `{member}` is at bit {} in type [{first_id}] but at bit {} in type [{id}]",
                    first.bit_offset,
                    loc.bit_offset
                ),
                Some(_) => {}
            }
        }
        let Some((_, loc)) = found else {
            bail!(
                "struct `{struct_name}` in kernel BTF has no member `{member}` (also searched its \
                 anonymous struct/union members)"
            );
        };
        Ok(loc)
    }

    /// Whether a BTF-enabled tracepoint `name` exists (typedef `btf_trace_<name>`).
    pub fn has_tracepoint(&self, name: &str) -> bool {
        let typedef = format!("{TRACEPOINT_TYPEDEF_PREFIX}{name}");
        self.ids_named(&typedef)
            .iter()
            .any(|&id| self.ty(id).is_some_and(|t| t.kind == kind::TYPEDEF))
    }

    /// Every BTF-enabled tracepoint of the kernel (`btf_trace_<name>`
    /// typedefs): name to type id. Small enough to keep once the rest of
    /// the BTF is dropped.
    pub fn tracepoints(&self) -> std::collections::BTreeMap<String, u32> {
        self.by_name
            .iter()
            .filter_map(|(name, ids)| {
                let tp = name.strip_prefix(TRACEPOINT_TYPEDEF_PREFIX)?;
                let id = ids
                    .iter()
                    .copied()
                    .find(|&id| self.ty(id).is_some_and(|t| t.kind == kind::TYPEDEF))?;
                Some((tp.to_owned(), id))
            })
            .collect()
    }

    /// Every BPF iterator target of the kernel (`bpf_iter_<what>` FUNCs):
    /// `<what>` to type id.
    pub fn iterators(&self) -> std::collections::BTreeMap<String, u32> {
        self.types
            .iter()
            .enumerate()
            .filter(|(_, t)| t.kind == kind::FUNC)
            .filter_map(|(id, t)| {
                let name = str_at(&self.strings, t.name_off)?;
                Some((
                    name.strip_prefix(ITERATOR_FUNC_PREFIX)?.to_owned(),
                    id as u32,
                ))
            })
            .collect()
    }

    /// Of `names`, those whose tracepoint is missing (for one clear error).
    pub fn missing_tracepoints<'a>(&self, names: &[&'a str]) -> Vec<&'a str> {
        names
            .iter()
            .copied()
            .filter(|name| !self.has_tracepoint(name))
            .collect()
    }

    fn ids_named(&self, name: &str) -> &[u32] {
        self.by_name.get(name).map_or(&[], Vec::as_slice)
    }

    fn ty(&self, id: u32) -> Option<&BtfType> {
        self.types.get(id as usize)
    }

    fn name(&self, name_off: u32) -> Option<&str> {
        str_at(&self.strings, name_off)
    }

    fn members_of(&self, t: &BtfType) -> &[Member] {
        let start = t.first_member as usize;
        self.members
            .get(start..start + t.member_count as usize)
            .unwrap_or(&[])
    }

    /// Follows TYPEDEF and qualifiers (CONST, VOLATILE, RESTRICT, TYPE_TAG)
    /// to the underlying type id; `None` when the chain is broken or too long.
    fn skip_modifiers(&self, mut id: u32) -> Option<u32> {
        for _ in 0..MAX_ANON_DEPTH {
            let t = self.ty(id)?;
            match t.kind {
                kind::TYPEDEF | kind::CONST | kind::VOLATILE | kind::RESTRICT | kind::TYPE_TAG => {
                    id = t.size_or_type;
                }
                _ => return Some(id),
            }
        }
        None
    }

    /// Depth-first search for member `name` in STRUCT/UNION `id`, descending
    /// into anonymous struct/union members in declaration order.
    fn find_member(
        &self,
        id: u32,
        name: &str,
        base_bits: u64,
        depth: usize,
    ) -> Result<Option<Location>> {
        ensure!(
            depth < MAX_ANON_DEPTH,
            "anonymous struct/union members nested deeper than {MAX_ANON_DEPTH} levels (cyclic BTF?)"
        );
        let Some(t) = self.ty(id) else {
            return Ok(None);
        };
        for m in self.members_of(t) {
            let (bits, bitfield_size) = if t.kind_flag {
                (m.offset & 0x00ff_ffff, m.offset >> 24)
            } else {
                (m.offset, 0)
            };
            let bit_offset = base_bits + u64::from(bits);
            match self.name(m.name_off) {
                Some(n) if n == name => {
                    return Ok(Some(Location {
                        bit_offset,
                        bitfield_size,
                        type_id: m.type_id,
                    }));
                }
                Some("") => {
                    let inner = self.skip_modifiers(m.type_id).filter(|&i| {
                        self.ty(i)
                            .is_some_and(|it| matches!(it.kind, kind::STRUCT | kind::UNION))
                    });
                    let found = match inner {
                        Some(inner) => self.find_member(inner, name, bit_offset, depth + 1)?,
                        None => None,
                    };
                    if found.is_some() {
                        return Ok(found);
                    }
                }
                _ => {}
            }
        }
        Ok(None)
    }
}

/// The byte offset of a located member; bitfields must start on a byte.
fn byte_offset(loc: &Location, struct_name: &str, member: &str) -> Result<u32> {
    if !loc.bit_offset.is_multiple_of(8) {
        bail!(
            "member `{member}` of struct `{struct_name}` is a bitfield{} at bit offset {}, \
                 not on a byte boundary",
            if loc.bitfield_size != 0 {
                format!(" of {} bits", loc.bitfield_size)
            } else {
                String::new()
            },
            loc.bit_offset
        );
    }
    u32::try_from(loc.bit_offset / 8).map_err(|_| {
        anyhow!(
            "member `{member}` of struct `{struct_name}` has an impossible offset of {} bits",
            loc.bit_offset
        )
    })
}

/// Walks the type section, recording each type and every struct/union member.
fn parse_types(r: Reader<'_>) -> Result<(Vec<BtfType>, Vec<Member>)> {
    let sec_len = r.bytes.len();
    let void = BtfType {
        kind: 0,
        kind_flag: false,
        name_off: 0,
        size_or_type: 0,
        first_member: 0,
        member_count: 0,
    };
    // Kernel BTF averages a little over 40 bytes per type.
    let mut types = Vec::with_capacity(sec_len / 40 + 1);
    types.push(void);
    let mut members = Vec::with_capacity(sec_len / 40);
    let mut pos = 0usize;
    while pos < sec_len {
        let id = types.len();
        let truncated = || {
            anyhow!(
                "BTF type [{id}] at type-section offset {pos} is truncated (section is {sec_len} \
                 bytes)"
            )
        };
        let name_off = r.u32_at(pos).ok_or_else(truncated)?;
        let info = r.u32_at(pos + 4).ok_or_else(truncated)?;
        let size_or_type = r.u32_at(pos + 8).ok_or_else(truncated)?;
        let k = ((info >> 24) & 0x1f) as u8;
        let vlen = (info & 0xffff) as usize;
        let kind_flag = info >> 31 == 1;
        let extra = match k {
            kind::INT | kind::VAR | kind::DECL_TAG => 4,
            kind::PTR
            | kind::FWD
            | kind::TYPEDEF
            | kind::VOLATILE
            | kind::CONST
            | kind::RESTRICT
            | kind::FUNC
            | kind::FLOAT
            | kind::TYPE_TAG => 0,
            kind::ARRAY => 12,
            kind::STRUCT | kind::UNION | kind::DATASEC | kind::ENUM64 => 12 * vlen,
            kind::ENUM | kind::FUNC_PROTO => 8 * vlen,
            other => bail!(
                "BTF type [{id}] at type-section offset {pos} has unsupported kind {other} ({})",
                kind::name(other)
            ),
        };
        let body = pos + TYPE_HEADER_LEN;
        // `pos <= u32::MAX` and `extra < 2^20`, so this cannot overflow.
        let end = body + extra;
        ensure!(
            end <= sec_len,
            "BTF type [{id}] ({}) at type-section offset {pos} runs past the end of the type \
             section ({sec_len} bytes): truncated blob?",
            kind::name(k)
        );
        let (first_member, member_count) = if matches!(k, kind::STRUCT | kind::UNION) {
            let first =
                u32::try_from(members.len()).map_err(|_| anyhow!("too many BTF members"))?;
            for i in 0..vlen {
                let m = body + 12 * i;
                members.push(Member {
                    name_off: r.u32_at(m).ok_or_else(truncated)?,
                    type_id: r.u32_at(m + 4).ok_or_else(truncated)?,
                    offset: r.u32_at(m + 8).ok_or_else(truncated)?,
                });
            }
            (first, vlen as u16)
        } else {
            (0, 0)
        };
        // At least 12 bytes per type in a section of at most u32::MAX bytes,
        // so ids always fit in u32.
        types.push(BtfType {
            kind: k,
            kind_flag,
            name_off,
            size_or_type,
            first_member,
            member_count,
        });
        pos = end;
    }
    Ok((types, members))
}

/// The NUL-terminated string at `off` in a string section, if valid UTF-8.
fn str_at(strings: &[u8], off: u32) -> Option<&str> {
    let tail = strings.get(off as usize..)?;
    let len = tail.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&tail[..len]).ok()
}

#[cfg(test)]
mod tests {
    const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

    use super::*;

    /// Test-only BTF encoder: types are added in order (first gets id 1).
    struct Encoder {
        big_endian: bool,
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Encoder {
        fn new(big_endian: bool) -> Self {
            Self {
                big_endian,
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        fn u32(&self, v: u32) -> [u8; 4] {
            if self.big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        }

        fn put(&mut self, v: u32) {
            let b = self.u32(v);
            self.types.extend_from_slice(&b);
        }

        fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        /// Adds a `struct btf_type` header followed by `extra` u32 words.
        fn add(
            &mut self,
            name: &str,
            k: u8,
            kind_flag: bool,
            vlen: u32,
            size_or_type: u32,
            extra: &[u32],
        ) -> u32 {
            let name_off = self.str(name);
            let info = (u32::from(kind_flag) << 31) | (u32::from(k) << 24) | vlen;
            self.put(name_off);
            self.put(info);
            self.put(size_or_type);
            for &w in extra {
                self.put(w);
            }
            let id = self.next_id;
            self.next_id += 1;
            id
        }

        /// STRUCT or UNION; members are (name, type id, raw offset field).
        fn aggregate(
            &mut self,
            k: u8,
            name: &str,
            kind_flag: bool,
            size: u32,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let mut extra = Vec::new();
            for &(n, t, off) in members {
                extra.extend([self.str(n), t, off]);
            }
            self.add(name, k, kind_flag, members.len() as u32, size, &extra)
        }

        fn finish(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&if self.big_endian {
                BTF_MAGIC.to_be_bytes()
            } else {
                BTF_MAGIC.to_le_bytes()
            });
            out.push(BTF_VERSION);
            out.push(0); // flags
            for v in [
                24,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&self.u32(v));
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A blob with one type of every kind first (so that a wrong skip size
    /// for any kind misplaces everything after it), then the test structs.
    fn sample(big_endian: bool) -> Vec<u8> {
        let mut e = Encoder::new(big_endian);
        // INT: encoding word = (encoding << 24) | (offset << 16) | bits.
        let int = e.add("int", kind::INT, false, 0, 4, &[(1 << 24) | 32]);
        let uint = e.add("unsigned int", kind::INT, false, 0, 4, &[32]);
        let long = e.add("long", kind::INT, false, 0, 8, &[(1 << 24) | 64]);
        let ptr = e.add("", kind::PTR, false, 0, int, &[]);
        let arr = e.add("", kind::ARRAY, false, 0, 0, &[int, int, 16]);
        let en = {
            let (a, b) = (e.str("E_A"), e.str("E_B"));
            e.add("e", kind::ENUM, false, 2, 4, &[a, 0, b, 1])
        };
        e.add("fwd_only", kind::FWD, false, 0, 0, &[]);
        let vol = e.add("", kind::VOLATILE, false, 0, int, &[]);
        let cst = e.add("", kind::CONST, false, 0, vol, &[]);
        e.add("", kind::RESTRICT, false, 0, ptr, &[]);
        let proto = {
            let p = e.str("arg");
            e.add("", kind::FUNC_PROTO, false, 2, int, &[p, int, 0, ptr])
        };
        let func = e.add("some_func", kind::FUNC, false, 1, proto, &[]);
        let var = e.add("some_var", kind::VAR, false, 0, arr, &[1]);
        e.add(".data", kind::DATASEC, false, 1, 64, &[var, 0, 64]);
        e.add("double", kind::FLOAT, false, 0, 8, &[]);
        e.add("some_tag", kind::DECL_TAG, false, 0, func, &[u32::MAX]);
        e.add("user", kind::TYPE_TAG, false, 0, int, &[]);
        {
            let (a, b) = (e.str("E64_A"), e.str("E64_B"));
            e.add("e64", kind::ENUM64, false, 2, 8, &[a, 1, 0, b, 0, 1]);
        }
        // "btf_trace_*" named things that are not typedefs do not count.
        e.aggregate(
            kind::STRUCT,
            "btf_trace_notatypedef",
            false,
            4,
            &[("x", int, 0)],
        );

        // struct inner_named { int q; } is not anonymous: not searched.
        let inner_named = e.aggregate(kind::STRUCT, "inner_named", false, 4, &[("q", int, 0)]);
        // struct { int e; long f; } (anonymous), nested in the union below.
        let anon_struct = e.aggregate(
            kind::STRUCT,
            "",
            false,
            16,
            &[("e", int, 0), ("f", long, 64)],
        );
        // union { int b; struct {...}; } (anonymous).
        let anon_union = e.aggregate(
            kind::UNION,
            "",
            false,
            16,
            &[("b", int, 0), ("", anon_struct, 0)],
        );
        // const-qualified anonymous struct member (seen through CONST).
        let anon2 = e.aggregate(kind::STRUCT, "", false, 4, &[("g", cst, 0)]);
        let const_anon2 = e.add("", kind::CONST, false, 0, anon2, &[]);
        e.aggregate(
            kind::STRUCT,
            "foo",
            false,
            48,
            &[
                ("a", int, 0),
                ("", anon_union, 64),        // byte 8
                ("named", inner_named, 192), // byte 24
                ("d", uint, 224),            // byte 28
                ("", const_anon2, 256),      // byte 32
                ("en", en, 288),             // byte 36
                ("old_bf", uint, 323),       // kind_flag=0 bitfield at bit 323
            ],
        );
        // kind_flag struct: offset = (bitfield_size << 24) | bit_offset.
        e.aggregate(
            kind::STRUCT,
            "bits",
            true,
            8,
            &[
                ("x", uint, 3 << 24),
                ("y", uint, (5 << 24) | 3),
                ("z", uint, (8 << 24) | 8),
                ("w", uint, 32), // not a bitfield
            ],
        );
        e.aggregate(
            kind::UNION,
            "some_union",
            false,
            8,
            &[("u1", int, 0), ("u2", long, 0)],
        );
        // Tracepoint typedef: btf_trace_foo -> PTR -> FUNC_PROTO.
        let tp_proto = e.add("", kind::FUNC_PROTO, false, 1, 0, &[0, ptr]);
        let tp_ptr = e.add("", kind::PTR, false, 0, tp_proto, &[]);
        e.add("btf_trace_foo", kind::TYPEDEF, false, 0, tp_ptr, &[]);
        e.finish()
    }

    fn err_text(r: Result<impl fmt::Debug>) -> String {
        format!("{:#}", r.expect_err("expected an error"))
    }

    #[test]
    fn offsets_in_plain_nested_and_bitfield_structs() {
        for big_endian in [false, true] {
            let btf = KernelBtf::parse(&sample(big_endian)).unwrap();
            assert_eq!(
                btf.types.len() - 1,
                30,
                "type count (big_endian={big_endian})"
            );
            assert_eq!(btf.member_offset("foo", "a").unwrap(), 0);
            assert_eq!(
                btf.member_offset("foo", "b").unwrap(),
                8,
                "member of anonymous union"
            );
            assert_eq!(
                btf.member_offset("foo", "e").unwrap(),
                8,
                "anon struct in anon union"
            );
            assert_eq!(
                btf.member_offset("foo", "f").unwrap(),
                16,
                "offsets add up when nested"
            );
            assert_eq!(btf.member_offset("foo", "named").unwrap(), 24);
            assert_eq!(btf.member_offset("foo", "d").unwrap(), 28);
            assert_eq!(
                btf.member_offset("foo", "g").unwrap(),
                32,
                "anon struct behind CONST"
            );
            assert_eq!(btf.member_offset("foo", "en").unwrap(), 36);
            assert_eq!(
                btf.member_offset("bits", "x").unwrap(),
                0,
                "byte-aligned bitfield"
            );
            assert_eq!(
                btf.member_offset("bits", "z").unwrap(),
                1,
                "byte-aligned bitfield"
            );
            assert_eq!(
                btf.member_offset("bits", "w").unwrap(),
                4,
                "kind_flag plain member"
            );
            assert_eq!(btf.member_offset("some_union", "u2").unwrap(), 0);
            assert_eq!(btf.member_offset("inner_named", "q").unwrap(), 0);
        }
    }

    #[test]
    fn member_errors_name_struct_and_member() {
        let btf = KernelBtf::parse(&sample(false)).unwrap();

        let e = err_text(btf.member_offset("nosuch", "a"));
        assert!(e.contains("`nosuch`") && e.contains("`a`"), "{e}");

        let e = err_text(btf.member_offset("foo", "nosuch_member"));
        assert!(e.contains("`foo`") && e.contains("`nosuch_member`"), "{e}");

        // Members of a *named* nested struct are not members of `foo`.
        let e = err_text(btf.member_offset("foo", "q"));
        assert!(e.contains("no member `q`"), "{e}");

        let e = err_text(btf.member_offset("bits", "y"));
        assert!(
            e.contains("bitfield")
                && e.contains("`y`")
                && e.contains("`bits`")
                && e.contains("bit offset 3"),
            "{e}"
        );
        let e = err_text(btf.member_offset("foo", "old_bf"));
        assert!(
            e.contains("bitfield") && e.contains("bit offset 323"),
            "{e}"
        );

        // Only STRUCT/UNION names count: typedefs, FWDs, ints do not.
        for not_a_struct in ["btf_trace_foo", "fwd_only", "int", "some_func"] {
            let e = err_text(btf.member_offset(not_a_struct, "x"));
            assert!(e.contains("no struct"), "{not_a_struct}: {e}");
        }
    }

    #[test]
    fn tracepoints() {
        let btf = KernelBtf::parse(&sample(false)).unwrap();
        assert!(btf.has_tracepoint("foo"));
        assert!(!btf.has_tracepoint("bar"));
        assert!(
            !btf.has_tracepoint("notatypedef"),
            "a struct named btf_trace_* is not a tracepoint"
        );
        assert!(!btf.has_tracepoint(""));
        assert!(!btf.has_tracepoint("fo"));
        assert_eq!(
            btf.missing_tracepoints(&["foo", "bar", "foo", "baz"]),
            vec!["bar", "baz"]
        );
        assert_eq!(btf.missing_tracepoints(&["foo"]), Vec::<&str>::new());
        assert_eq!(btf.missing_tracepoints(&[]), Vec::<&str>::new());
    }

    #[test]
    fn header_errors() {
        let good = sample(false);
        assert!(KernelBtf::parse(&good).is_ok());

        let mut bad = good.clone();
        bad[0] = 0x00;
        assert!(err_text(KernelBtf::parse(&bad)).contains("magic"));

        let mut bad = good.clone();
        bad[2] = 2;
        assert!(err_text(KernelBtf::parse(&bad)).contains("version 2"));

        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&(good.len() as u32 + 1).to_le_bytes());
        assert!(err_text(KernelBtf::parse(&bad)).contains("header length"));

        // String section length one byte too long.
        let mut bad = good.clone();
        let str_len = u32::from_le_bytes(bad[20..24].try_into().unwrap());
        bad[20..24].copy_from_slice(&(str_len + 1).to_le_bytes());
        assert!(err_text(KernelBtf::parse(&bad)).contains("string section"));

        // Offset + length overflowing usize arithmetic on 32-bit, and
        // simply huge on 64-bit.
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        bad[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(err_text(KernelBtf::parse(&bad)).contains("type section"));

        // A type section that ends inside a type record.
        let mut bad = good.clone();
        let type_len = u32::from_le_bytes(bad[12..16].try_into().unwrap());
        bad[12..16].copy_from_slice(&(type_len - 4).to_le_bytes());
        let e = err_text(KernelBtf::parse(&bad));
        assert!(
            e.contains("runs past the end of the type section") || e.contains("truncated"),
            "{e}"
        );

        // Unknown kind in the first record.
        let mut bad = good.clone();
        bad[24 + 4 + 3] = 0x1f; // info's top byte (little-endian) = kind 31
        assert!(err_text(KernelBtf::parse(&bad)).contains("unsupported kind 31"));

        assert!(err_text(KernelBtf::parse(&[])).contains("too short"));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let good = sample(false);
        for len in 0..good.len() {
            assert!(
                KernelBtf::parse(&good[..len]).is_err(),
                "prefix of {len} bytes parsed"
            );
        }
    }

    #[test]
    fn corrupted_blobs_never_panic() {
        // Deterministic xorshift; corrupt 1-4 random bytes (header included)
        // and run every query on whatever still parses.
        let good = sample(false);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut parsed = 0;
        for _ in 0..20_000 {
            let mut blob = good.clone();
            for _ in 0..=(next() % 4) {
                let i = (next() % blob.len() as u64) as usize;
                blob[i] = next() as u8;
            }
            if let Ok(btf) = KernelBtf::parse(&blob) {
                parsed += 1;
                for (s, m) in [("foo", "f"), ("foo", "g"), ("bits", "y"), ("foo", "zz")] {
                    let _ = btf.member_offset(s, m);
                }
                let _ = btf.missing_tracepoints(&["foo", "bar"]);
            }
        }
        assert!(parsed > 0, "some corruptions (e.g. in strings) still parse");
    }

    #[test]
    fn cyclic_anonymous_members_error_instead_of_overflowing() {
        let mut e = Encoder::new(false);
        let int = e.add("int", kind::INT, false, 0, 4, &[32]);
        // Type 2 is an anonymous struct whose anonymous member is itself.
        e.aggregate(kind::STRUCT, "", false, 4, &[("", 2, 0)]);
        e.aggregate(
            kind::STRUCT,
            "loop",
            false,
            4,
            &[("", 2, 0), ("late", int, 0)],
        );
        let btf = KernelBtf::parse(&e.finish()).unwrap();
        let err = err_text(btf.member_offset("loop", "late"));
        assert!(err.contains("cyclic") && err.contains("loop.late"), "{err}");
    }

    #[test]
    fn conflicting_duplicate_structs_are_reported() {
        let mut e = Encoder::new(false);
        let int = e.add("int", kind::INT, false, 0, 4, &[32]);
        e.aggregate(
            kind::STRUCT,
            "dup",
            false,
            8,
            &[("a", int, 0), ("b", int, 32)],
        );
        e.aggregate(kind::STRUCT, "dup", false, 8, &[("b", int, 0)]);
        e.aggregate(kind::STRUCT, "dup", false, 0, &[]); // empty: ignored
        let btf = KernelBtf::parse(&e.finish()).unwrap();
        assert_eq!(btf.member_offset("dup", "a").unwrap(), 0);
        let err = err_text(btf.member_offset("dup", "b"));
        assert!(
            err.contains("conflicting") && err.contains("`dup`"),
            "{err}"
        );
    }

    #[test]
    fn from_file_reads_and_reports_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinux");
        std::fs::write(&path, sample(false)).unwrap();
        let btf = KernelBtf::from_file(&path).unwrap();
        assert_eq!(btf.member_offset("foo", "f").unwrap(), 16);

        let missing = dir.path().join("no-such-btf");
        let e = err_text(KernelBtf::from_file(&missing));
        assert!(e.contains("CONFIG_DEBUG_INFO_BTF"), "{e}");
        assert!(e.contains(&missing.display().to_string()), "{e}");

        std::fs::write(&path, b"definitely not BTF, but long enough").unwrap();
        let e = err_text(KernelBtf::from_file(&path));
        assert!(
            e.contains("magic") && e.contains(&path.display().to_string()),
            "{e}"
        );
    }

    // ---- Against the running kernel -------------------------------------

    /// Set to skip the tests that read the running kernel's BTF (for
    /// machines without /sys/kernel/btf/vmlinux).
    const SKIP_ENV: &str = "CIS490_SKIP_KERNEL_BTF_TESTS";

    fn kernel_btf() -> Option<KernelBtf> {
        if std::env::var_os(SKIP_ENV).is_some() {
            eprintln!("{SKIP_ENV} set: skipping kernel BTF test");
            return None;
        }
        Some(
            KernelBtf::from_file(Path::new(VMLINUX)).unwrap_or_else(|e| {
                panic!("{e:#}\n(set {SKIP_ENV}=1 to skip the tests that need the kernel's BTF)")
            }),
        )
    }

    #[test]
    fn kernel_task_struct_pid_tgid() {
        let Some(btf) = kernel_btf() else { return };
        let pid = btf.member_offset("task_struct", "pid").unwrap();
        let tgid = btf.member_offset("task_struct", "tgid").unwrap();
        assert!(pid > 0, "pid is not the first member of task_struct");
        assert_eq!(tgid, pid + 4, "tgid follows pid (both pid_t)");
        assert!(
            btf.member_offset("task_struct", "no_such_member_xyz")
                .is_err()
        );
    }

    #[test]
    fn kernel_member_paths() {
        let Some(btf) = kernel_btf() else { return };
        let se = btf.member_offset("task_struct", "se").unwrap();
        let rt = btf
            .member_offset("sched_entity", "sum_exec_runtime")
            .unwrap();
        assert_eq!(
            btf.member_path_offset("task_struct", "se.sum_exec_runtime")
                .unwrap(),
            se + rt
        );
        assert_eq!(
            btf.member_path_offset("task_struct", "pid").unwrap(),
            btf.member_offset("task_struct", "pid").unwrap()
        );
        // sk_buff.dev sits in anonymous unions; net_device.nd_net.net likewise.
        assert!(btf.member_path_offset("sk_buff", "dev").is_ok());
        assert!(btf.member_path_offset("net_device", "nd_net.net").is_ok());
        let e = btf
            .member_path_offset("task_struct", "pid.x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("task_struct.pid") && e.contains("not a struct"),
            "{e}"
        );
        let e = btf
            .member_path_offset("task_struct", "se.nope")
            .unwrap_err()
            .to_string();
        assert!(e.contains("task_struct.se") && e.contains("nope"), "{e}");
    }

    #[test]
    fn kernel_tracepoints() {
        let Some(btf) = kernel_btf() else { return };
        let wanted = [
            "sched_switch",
            "sched_wakeup",
            "task_newtask",
            "task_rename",
        ];
        for tp in wanted {
            assert!(
                btf.has_tracepoint(tp),
                "tracepoint {tp} missing from kernel BTF"
            );
        }
        let made_up = "cis490_no_such_tracepoint";
        assert!(!btf.has_tracepoint(made_up));
        let mut names = wanted.to_vec();
        names.push(made_up);
        assert_eq!(btf.missing_tracepoints(&names), vec![made_up]);
    }

    /// One STRUCT/UNION of `bpftool btf dump ... format raw`.
    #[derive(Debug, Default)]
    struct DumpedStruct {
        name: String,
        is_struct: bool,
        /// (name, type id, bits_offset, bitfield_size)
        members: Vec<(String, u32, u64, u32)>,
    }

    /// Parses the STRUCT/UNION records of bpftool's raw dump, by type id.
    fn parse_bpftool_raw(text: &str) -> HashMap<u32, DumpedStruct> {
        let mut out = HashMap::new();
        let mut current: Option<(u32, DumpedStruct)> = None;
        let field = |line: &str, key: &str| -> Option<u64> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(|v| v.parse().unwrap())
        };
        let quoted = |line: &str| -> String {
            let start = line.find('\'').unwrap() + 1;
            let len = line[start..].find('\'').unwrap();
            line[start..start + len].to_string()
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix('[') {
                out.extend(current.take());
                let (id, rest) = rest.split_once("] ").unwrap();
                let k = rest.split_whitespace().next().unwrap();
                if k == "STRUCT" || k == "UNION" {
                    current = Some((
                        id.parse().unwrap(),
                        DumpedStruct {
                            name: quoted(rest),
                            is_struct: k == "STRUCT",
                            members: Vec::new(),
                        },
                    ));
                }
            } else if let (Some((_, s)), Some(l)) = (current.as_mut(), line.strip_prefix('\t')) {
                s.members.push((
                    quoted(l),
                    field(l, "type_id=").unwrap() as u32,
                    field(l, "bits_offset=").unwrap(),
                    field(l, "bitfield_size=").unwrap_or(0) as u32,
                ));
            }
        }
        out.extend(current.take());
        out
    }

    /// Flattens a dumped struct: every member reachable through anonymous
    /// struct/union members, with its total bit offset, first match wins.
    fn flatten(
        all: &HashMap<u32, DumpedStruct>,
        s: &DumpedStruct,
        base: u64,
        out: &mut Vec<(String, u64, u32)>,
    ) {
        for (name, type_id, bits, bf) in &s.members {
            if name == "(anon)" {
                if let Some(inner) = all.get(type_id).filter(|i| i.name == "(anon)") {
                    flatten(all, inner, base + bits, out);
                }
            } else if !out.iter().any(|(n, ..)| n == name) {
                out.push((name.clone(), base + bits, *bf));
            }
        }
    }

    /// Cross-checks every member offset of every uniquely named kernel
    /// struct/union against bpftool's independent decoding.
    #[test]
    fn kernel_offsets_agree_with_bpftool() {
        let Some(btf) = kernel_btf() else { return };
        let bpftool = ["/usr/sbin/bpftool", "/usr/bin/bpftool", "/sbin/bpftool"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        // A missing bpftool is a failure, not a skip: `cargo xtask test`
        // installs Debian's `bpftool` package before the unit tests.
        let bpftool = bpftool.unwrap_or_else(|| {
            panic!(
                "bpftool is not installed (/usr/sbin/bpftool): this test checks every offset \
                 against it; `cargo xtask test` installs it (apt-get install bpftool), or set \
                 {SKIP_ENV}=1 to skip the tests that need the kernel's BTF"
            )
        });
        let out = std::process::Command::new(bpftool)
            .args(["btf", "dump", "file", VMLINUX, "format", "raw"])
            .output()
            .expect("running bpftool");
        assert!(
            out.status.success(),
            "bpftool failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let last_id: usize = text
            .lines()
            .filter_map(|l| l.strip_prefix('[')?.split_once(']')?.0.parse().ok())
            .max()
            .unwrap();
        assert_eq!(
            btf.types.len() - 1,
            last_id,
            "type count differs from bpftool's"
        );

        let dumped = parse_bpftool_raw(&text);
        let mut name_count: HashMap<&str, usize> = HashMap::new();
        for s in dumped.values() {
            *name_count.entry(&s.name).or_default() += 1;
        }

        // task_struct.pid / tgid in particular.
        let task = dumped
            .values()
            .find(|s| s.name == "task_struct" && s.is_struct)
            .unwrap();
        let mut flat = Vec::new();
        flatten(&dumped, task, 0, &mut flat);
        for m in ["pid", "tgid"] {
            let (_, bits, _) = flat.iter().find(|(n, ..)| n == m).unwrap();
            assert_eq!(
                u64::from(btf.member_offset("task_struct", m).unwrap()) * 8,
                *bits,
                "task_struct.{m}"
            );
        }

        let (mut checked, mut nested, mut bitfield_errors) = (0usize, 0usize, 0usize);
        for s in dumped.values() {
            if s.name == "(anon)" || name_count[s.name.as_str()] != 1 {
                continue;
            }
            let mut flat = Vec::new();
            flatten(&dumped, s, 0, &mut flat);
            for (member, bits, bf) in &flat {
                let got = btf.member_offset(&s.name, member);
                if bits % 8 != 0 {
                    let e = err_text(got);
                    assert!(e.contains("bitfield"), "{}.{member}: {e}", s.name);
                    bitfield_errors += 1;
                } else {
                    let got = got.unwrap_or_else(|e| {
                        panic!("{}.{member} (bitfield_size={bf}): {e:#}", s.name)
                    });
                    assert_eq!(u64::from(got) * 8, *bits, "{}.{member}", s.name);
                }
                checked += 1;
                if s.members.iter().all(|(n, ..)| n != member) {
                    nested += 1;
                }
            }
        }
        eprintln!(
            "checked {checked} members ({nested} through anonymous members, {bitfield_errors} unaligned bitfields)"
        );
        assert!(
            checked > 10_000 && nested > 100 && bitfield_errors > 100,
            "too little was cross-checked"
        );
    }
}
