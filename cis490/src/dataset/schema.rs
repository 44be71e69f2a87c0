//! The dataset's tables as Arrow schemas, and the mapping from an episode's
//! typed lines to Arrow record batches. One schema per table, the same for
//! every episode and source: a field a source does not measure is a null
//! value, never a missing column; the keyed objects of a row (`net_by_if`,
//! `blk_by_dev`, `kvm_exit_reasons`, `kvm_userspace_exit_reasons`), whose
//! keys differ between episodes, are long side tables with one row per key.
//!
//! No column is named like a partition key (`source`, `date`, `host`): the
//! partition path carries those, and Spark refuses a column that is both.

use std::sync::Arc;

use anyhow::Result;
use arrow_array::{
    ArrayRef, Int64Array, RecordBatch, UInt32Array,
    builder::{
        BooleanBuilder, Float64Builder, ListBuilder, MapBuilder, StringBuilder, UInt32Builder,
        UInt64Builder,
    },
};
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};
use parquet::{
    arrow::ArrowWriter,
    basic::Compression,
    file::{metadata::KeyValue, properties::WriterProperties},
};

use super::{DATASET_VERSION, Episode, EventLine, LabelLine};
use crate::row::{Measures, Row};

/// A `u64` measure of [`Measures`].
type U64Of = fn(&Measures) -> Option<u64>;
/// A histogram of [`Measures`].
type HistOf = fn(&Measures) -> Option<&Vec<u64>>;
/// The number of entries of a keyed object of [`Measures`].
type KeysOf = fn(&Measures) -> Option<usize>;

/// A measure column of the telemetry table.
#[derive(Clone, Copy)]
pub enum Measure {
    /// A count, ns or bytes: `UInt64`, nullable.
    U64(&'static str, U64Of),
    /// A log2 histogram: `List<UInt64>`, nullable.
    Hist(&'static str, HistOf),
    /// A keyed object: its side table holds the entries; here
    /// `<name>_entries` (`UInt32`, nullable) keeps null apart from empty.
    Keyed(&'static str, KeysOf),
}

impl Measure {
    /// The field name in `Row` (and in the JSONL).
    pub fn row_field(&self) -> &'static str {
        match *self {
            Self::U64(n, _) | Self::Hist(n, _) | Self::Keyed(n, _) => n,
        }
    }
}

macro_rules! measures {
    ($($kind:ident $name:ident),* $(,)?) => {
        /// Every measure of [`Measures`], in the order of its fields.
        pub const MEASURES: &[Measure] = &[$(measures!(@one $kind $name)),*];
    };
    (@one u64 $name:ident) => { Measure::U64(stringify!($name), |m| m.$name) };
    (@one guest $name:ident) => { Measure::U64(stringify!($name), |m| m.guest.$name) };
    (@one hist $name:ident) => { Measure::Hist(stringify!($name), |m| m.$name.as_ref()) };
    (@one gw $name:ident) => { Measure::U64(stringify!($name), |m| m.gw.$name) };
    (@one gwhist $name:ident) => { Measure::Hist(stringify!($name), |m| m.gw.$name.as_ref()) };
    (@one keyed $name:ident) => { Measure::Keyed(stringify!($name), |m| m.$name.as_ref().map(|o| o.len())) };
}

measures!(
    u64 cpu_ns,
    u64 ctx_switches_voluntary,
    u64 ctx_switches_involuntary,
    u64 ctx_switches,
    u64 runq_delay_ns,
    u64 threads,
    u64 wakeups,
    u64 migrations,
    u64 runq_delay_max_ns,
    hist runq_delay_hist_log2,
    u64 events,
    u64 dropped_events,
    u64 blk_read_ops,
    u64 blk_write_ops,
    u64 blk_read_bytes,
    u64 blk_write_bytes,
    u64 io_write_bytes,
    u64 blk_latency_ns_sum,
    u64 blk_latency_max_ns,
    hist blk_latency_hist_log2,
    u64 net_tx_bytes,
    u64 net_rx_bytes,
    u64 net_tx_packets,
    u64 net_rx_packets,
    keyed net_by_if,
    u64 kvm_exits,
    keyed kvm_exit_reasons,
    u64 kvm_userspace_exits,
    keyed kvm_userspace_exit_reasons,
    keyed blk_by_dev,
    u64 page_faults_minor,
    u64 page_faults_major,
    u64 cycles,
    u64 instructions,
    u64 cache_references,
    u64 cache_misses,
    u64 branch_misses,
    guest guest_cpu_user_ns,
    guest guest_cpu_system_ns,
    guest guest_cpu_idle_ns,
    guest guest_cpu_iowait_ns,
    guest guest_mem_used_bytes,
    guest guest_mem_available_bytes,
    guest guest_procs,
    guest guest_execs,
    guest guest_net_tx_bytes,
    guest guest_net_rx_bytes,
    guest guest_disk_read_bytes,
    guest guest_disk_write_bytes,
    guest guest_tcp_conns,
    guest guest_lines,
    guest guest_bad_lines,
    guest guest_skipped_lines,
    gw gw_out_frames,
    gw gw_out_bytes,
    gw gw_in_frames,
    gw gw_in_bytes,
    gw gw_ipv4_frames,
    gw gw_ipv6_frames,
    gw gw_arp_frames,
    gw gw_other_frames,
    gw gw_tcp_frames,
    gw gw_udp_frames,
    gw gw_icmp_frames,
    gw gw_tcp_syn,
    gw gw_tcp_synack_in,
    gw gw_tcp_rst_in,
    gw gw_tcp_rst_out,
    gw gw_tcp_fin,
    gw gw_dns_queries,
    gw gw_dns_nxdomain,
    gw gw_new_flows,
    gw gw_remote_ips,
    gw gw_remote_ports,
    gw gw_distinct_overflow,
    gwhist gw_frame_size_hist_log2,
);

/// One entry of a keyed object: its key and its counters.
type Entries = Vec<(String, Vec<u64>)>;

/// A long side table: one row per (row, key) of a keyed object.
pub struct SideTable {
    /// The keyed object (and the table's directory).
    pub name: &'static str,
    /// The key column.
    pub key: &'static str,
    /// The counter columns, `UInt64` not null.
    pub counters: &'static [&'static str],
    pub entries: fn(&Measures) -> Entries,
}

pub const SIDE_TABLES: [SideTable; 4] = [
    SideTable {
        name: "net_by_if",
        key: "interface",
        counters: &["tx_bytes", "rx_bytes", "tx_packets", "rx_packets"],
        entries: |m| {
            m.net_by_if
                .iter()
                .flatten()
                .map(|(k, c)| {
                    (
                        k.clone(),
                        vec![c.tx_bytes, c.rx_bytes, c.tx_packets, c.rx_packets],
                    )
                })
                .collect()
        },
    },
    SideTable {
        name: "blk_by_dev",
        key: "device",
        counters: &["read_bytes", "write_bytes", "read_ops", "write_ops"],
        entries: |m| {
            m.blk_by_dev
                .iter()
                .flatten()
                .map(|(k, c)| {
                    (
                        k.clone(),
                        vec![c.read_bytes, c.write_bytes, c.read_ops, c.write_ops],
                    )
                })
                .collect()
        },
    },
    SideTable {
        name: "kvm_exit_reasons",
        key: "reason",
        counters: &["count"],
        entries: |m| {
            m.kvm_exit_reasons
                .iter()
                .flatten()
                .map(|(k, c)| (k.clone(), vec![*c]))
                .collect()
        },
    },
    SideTable {
        name: "kvm_userspace_exit_reasons",
        key: "reason",
        counters: &["count"],
        entries: |m| {
            m.kvm_userspace_exit_reasons
                .iter()
                .flatten()
                .map(|(k, c)| (k.clone(), vec![*c]))
                .collect()
        },
    },
];

fn u64_field(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::UInt64, nullable)
}

/// The item field of a histogram list (elements are never null).
fn hist_item() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::UInt64, false))
}

/// The envelope columns of every telemetry row (all not null).
const ENVELOPE_U64: [&str; 4] = ["t_mono_ns", "t_wall_ns", "interval_ns", "seq"];

/// `telemetry/`: one row per bucket of one source.
pub fn telemetry_schema() -> SchemaRef {
    let mut fields = vec![
        Field::new("episode_id", DataType::Utf8, false),
        Field::new("available_in_deployment", DataType::Boolean, false),
    ];
    fields.extend(ENVELOPE_U64.iter().map(|n| u64_field(n, false)));
    for m in MEASURES {
        fields.push(match *m {
            Measure::U64(n, _) => u64_field(n, true),
            Measure::Hist(n, _) => Field::new(n, DataType::List(hist_item()), true),
            Measure::Keyed(n, _) => Field::new(format!("{n}_entries"), DataType::UInt32, true),
        });
    }
    Arc::new(Schema::new(fields))
}

/// A side table's schema: `episode_id, seq, <key>, <counters...>`.
pub fn side_schema(t: &SideTable) -> SchemaRef {
    let mut fields = vec![
        Field::new("episode_id", DataType::Utf8, false),
        u64_field("seq", false),
        Field::new(t.key, DataType::Utf8, false),
    ];
    fields.extend(t.counters.iter().map(|c| u64_field(c, false)));
    Arc::new(Schema::new(fields))
}

fn tags_type() -> (Fields, DataType) {
    let entry = Fields::from(vec![
        Field::new("keys", DataType::Utf8, false),
        Field::new("values", DataType::Utf8, false),
    ]);
    let map = DataType::Map(
        Arc::new(Field::new(
            "entries",
            DataType::Struct(entry.clone()),
            false,
        )),
        false,
    );
    (entry, map)
}

/// `episodes/`: one row per episode, from `meta.json`.
pub fn episodes_schema() -> SchemaRef {
    let s = |n: &str, null| Field::new(n, DataType::Utf8, null);
    Arc::new(Schema::new(vec![
        s("episode_id", false),
        Field::new("dataset_version", DataType::UInt32, false),
        Field::new("meta_schema_version", DataType::UInt32, false),
        s("cis490_version", false),
        s("hostname", false),
        s("kernel_release", false),
        u64_field("cpus", false),
        Field::new("target_pid", DataType::Int64, false),
        s("target_mode", false),
        s("target_comm", false),
        s("target_exe", true),
        Field::new(
            "target_cmdline",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, false))),
            false,
        ),
        u64_field("interval_ns", false),
        Field::new("duration_limit_s", DataType::Float64, true),
        u64_field("start_t_mono_ns", false),
        u64_field("start_t_wall_ns", false),
        u64_field("end_t_mono_ns", true),
        u64_field("end_t_wall_ns", true),
        s("end_reason", true),
        u64_field("skipped_boundaries", false),
        Field::new(
            "sources",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, false))),
            false,
        ),
        Field::new("tags", tags_type().1, false),
        s("meta_json", false),
    ]))
}

/// `events/`: one row per line of `events.jsonl`.
pub fn events_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("episode_id", DataType::Utf8, false),
        u64_field("t_mono_ns", false),
        u64_field("t_wall_ns", false),
        u64_field("seq", true),
        Field::new("event", DataType::Utf8, false),
        Field::new("data", DataType::Utf8, false),
    ]))
}

/// `labels/`: one row per line of `labels.jsonl`.
pub fn labels_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("episode_id", DataType::Utf8, false),
        u64_field("t_mono_ns", false),
        u64_field("t_wall_ns", false),
        u64_field("seq", true),
        Field::new("label", DataType::Utf8, false),
        Field::new("via", DataType::Utf8, false),
    ]))
}

fn strings<'a>(n: usize, it: impl Iterator<Item = &'a str>) -> ArrayRef {
    let mut b = StringBuilder::with_capacity(n, 0);
    it.for_each(|s| b.append_value(s));
    Arc::new(b.finish())
}

fn u64s(it: impl Iterator<Item = Option<u64>>) -> ArrayRef {
    let mut b = UInt64Builder::new();
    it.for_each(|v| b.append_option(v));
    Arc::new(b.finish())
}

/// The telemetry rows of one source.
pub fn telemetry_batch(rows: &[Row]) -> Result<RecordBatch> {
    let n = rows.len();
    let mut cols: Vec<ArrayRef> = vec![strings(n, rows.iter().map(|r| r.episode_id.as_str()))];
    let mut avail = BooleanBuilder::with_capacity(n);
    rows.iter()
        .for_each(|r| avail.append_value(r.available_in_deployment));
    cols.push(Arc::new(avail.finish()));
    cols.push(u64s(rows.iter().map(|r| Some(r.t_mono_ns))));
    cols.push(u64s(rows.iter().map(|r| Some(r.t_wall_ns))));
    cols.push(u64s(rows.iter().map(|r| Some(r.interval_ns))));
    cols.push(u64s(rows.iter().map(|r| Some(r.seq))));
    for m in MEASURES {
        cols.push(match *m {
            Measure::U64(_, f) => u64s(rows.iter().map(|r| f(&r.m))),
            Measure::Hist(_, f) => {
                let mut b = ListBuilder::new(UInt64Builder::new()).with_field(hist_item());
                for r in rows {
                    b.append_option(f(&r.m).map(|h| h.iter().map(|&x| Some(x))));
                }
                Arc::new(b.finish())
            }
            Measure::Keyed(_, f) => {
                let mut b = UInt32Builder::with_capacity(n);
                for r in rows {
                    let len = f(&r.m).map(u32::try_from).transpose()?;
                    b.append_option(len);
                }
                Arc::new(b.finish())
            }
        });
    }
    Ok(RecordBatch::try_new(telemetry_schema(), cols)?)
}

/// The side table `t` of one source's rows: entries in row order, keys in
/// their (sorted) order within a row.
pub fn side_batch(t: &SideTable, rows: &[Row]) -> Result<RecordBatch> {
    let (mut ids, mut seqs, mut keys) = (
        StringBuilder::new(),
        UInt64Builder::new(),
        StringBuilder::new(),
    );
    let mut counters: Vec<UInt64Builder> =
        t.counters.iter().map(|_| UInt64Builder::new()).collect();
    for r in rows {
        for (k, vals) in (t.entries)(&r.m) {
            ids.append_value(&r.episode_id);
            seqs.append_value(r.seq);
            keys.append_value(&k);
            for (b, v) in counters.iter_mut().zip(vals) {
                b.append_value(v);
            }
        }
    }
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        Arc::new(seqs.finish()),
        Arc::new(keys.finish()),
    ];
    cols.extend(
        counters
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef),
    );
    Ok(RecordBatch::try_new(side_schema(t), cols)?)
}

/// The one `episodes` row of an episode.
pub fn episode_batch(ep: &Episode) -> Result<RecordBatch> {
    let m = &ep.meta;
    let one = |s: &str| strings(1, std::iter::once(s));
    let opt = |s: Option<&str>| {
        let mut b = StringBuilder::new();
        b.append_option(s);
        Arc::new(b.finish()) as ArrayRef
    };
    let u32_one = |v: u32| Arc::new(UInt32Array::from(vec![v])) as ArrayRef;
    let list = |items: &[String]| {
        let item = Arc::new(Field::new("item", DataType::Utf8, false));
        let mut b = ListBuilder::new(StringBuilder::new()).with_field(item);
        b.append_value(items.iter().map(Some));
        Arc::new(b.finish()) as ArrayRef
    };
    let (entry, _) = tags_type();
    let mut tags = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new())
        .with_keys_field(Arc::new(entry[0].as_ref().clone()))
        .with_values_field(Arc::new(entry[1].as_ref().clone()));
    for (k, v) in &m.tags {
        tags.keys().append_value(k);
        tags.values().append_value(v);
    }
    tags.append(true)?;
    let mut duration = Float64Builder::new();
    duration.append_option(m.duration_limit_s);
    let start = m.start.expect("Episode::read requires start");
    let sources: Vec<String> = m
        .sources
        .iter()
        .map(|s| s.source.name().to_owned())
        .collect();
    let cols: Vec<ArrayRef> = vec![
        one(&m.id),
        u32_one(DATASET_VERSION),
        u32_one(m.schema_version),
        one(&m.cis490_version),
        one(&m.host.hostname),
        one(&m.host.kernel_release),
        u64s(std::iter::once(Some(m.host.cpus))),
        Arc::new(Int64Array::from(vec![m.target.pid])),
        one(&m.target.mode),
        one(&m.target.comm),
        opt(m.target.exe.as_deref()),
        list(&m.target.cmdline),
        u64s(std::iter::once(Some(m.interval_ns))),
        Arc::new(duration.finish()),
        u64s(std::iter::once(Some(start.t_mono_ns))),
        u64s(std::iter::once(Some(start.t_wall_ns))),
        u64s(std::iter::once(m.end.map(|c| c.t_mono_ns))),
        u64s(std::iter::once(m.end.map(|c| c.t_wall_ns))),
        opt(m.end_reason.as_deref()),
        u64s(std::iter::once(Some(m.skipped_boundaries))),
        list(&sources),
        Arc::new(tags.finish()),
        one(&ep.meta_text),
    ];
    Ok(RecordBatch::try_new(episodes_schema(), cols)?)
}

/// The `events` rows of an episode.
pub fn events_batch(id: &str, events: &[EventLine]) -> Result<RecordBatch> {
    let n = events.len();
    let data: Vec<String> = events
        .iter()
        .map(|e| serde_json::to_string(&e.data))
        .collect::<Result<_, _>>()?;
    let cols: Vec<ArrayRef> = vec![
        strings(n, std::iter::repeat_n(id, n)),
        u64s(events.iter().map(|e| Some(e.t_mono_ns))),
        u64s(events.iter().map(|e| Some(e.t_wall_ns))),
        u64s(events.iter().map(|e| e.seq)),
        strings(n, events.iter().map(|e| e.event.as_str())),
        strings(n, data.iter().map(String::as_str)),
    ];
    Ok(RecordBatch::try_new(events_schema(), cols)?)
}

/// The `labels` rows of an episode.
pub fn labels_batch(id: &str, labels: &[LabelLine]) -> Result<RecordBatch> {
    let n = labels.len();
    let cols: Vec<ArrayRef> = vec![
        strings(n, std::iter::repeat_n(id, n)),
        u64s(labels.iter().map(|l| Some(l.t_mono_ns))),
        u64s(labels.iter().map(|l| Some(l.t_wall_ns))),
        u64s(labels.iter().map(|l| l.seq)),
        strings(n, labels.iter().map(|l| l.label.as_str())),
        strings(n, labels.iter().map(|l| l.via.as_str())),
    ];
    Ok(RecordBatch::try_new(labels_schema(), cols)?)
}

/// A batch as one Parquet file, in memory. Deterministic: the same batch
/// gives the same bytes (no timestamps; `created_by` names the writer's
/// version; the dataset version is in the key-value metadata).
pub fn parquet_bytes(batch: &RecordBatch) -> Result<Vec<u8>> {
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_key_value_metadata(Some(vec![KeyValue::new(
            "cis490.dataset_version".to_owned(),
            DATASET_VERSION.to_string(),
        )]))
        .build();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))?;
    w.write(batch)?;
    w.close()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use arrow_array::{
        Array as _, BooleanArray, ListArray, MapArray, StringArray, UInt32Array, UInt64Array,
        cast::AsArray as _,
    };
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;
    use crate::dataset::fixture;

    fn read_back(bytes: Vec<u8>) -> RecordBatch {
        let mut r = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
            .unwrap()
            .build()
            .unwrap();
        let b = r.next().unwrap().unwrap();
        assert!(r.next().is_none(), "one batch");
        b
    }

    fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> &'a T {
        b.column_by_name(name)
            .unwrap_or_else(|| panic!("no column {name}"))
            .as_any()
            .downcast_ref::<T>()
            .unwrap_or_else(|| panic!("{name} has another type"))
    }

    #[test]
    fn every_row_field_has_a_column() {
        // The row's fields, as the JSONL has them, in order.
        let row = serde_json::to_value(fixture::row("01A", 0, &["tap0"])).unwrap();
        let fields: Vec<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut mapped = vec!["episode_id", "source", "available_in_deployment"];
        mapped.extend(ENVELOPE_U64);
        mapped.extend(MEASURES.iter().map(Measure::row_field));
        assert_eq!(mapped, fields, "MEASURES follows Measures field by field");
        // The telemetry columns: the same, `source` in the path, each keyed
        // object as `<name>_entries`.
        let cols: Vec<String> = telemetry_schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let want: Vec<String> = fields
            .iter()
            .filter(|f| **f != "source")
            .map(|f| {
                if SIDE_TABLES.iter().any(|t| t.name == *f) {
                    format!("{f}_entries")
                } else {
                    (*f).to_owned()
                }
            })
            .collect();
        assert_eq!(cols, want);
        // No column of any table is named like a partition.
        for s in [
            telemetry_schema(),
            episodes_schema(),
            events_schema(),
            labels_schema(),
        ]
        .into_iter()
        .chain(SIDE_TABLES.iter().map(side_schema))
        {
            for p in ["source", "date", "host"] {
                assert!(s.field_with_name(p).is_err(), "{p} in {s:?}");
            }
        }
    }

    #[test]
    fn telemetry_rows_round_trip_through_parquet() {
        let mut rows: Vec<Row> = (0..3)
            .map(|s| fixture::row("01A", s, &["tap0", "sockets"]))
            .collect();
        rows[1].m = Measures::default(); // a row of nulls
        rows[2].m.cpu_ns = Some(u64::MAX);
        let b = read_back(parquet_bytes(&telemetry_batch(&rows).unwrap()).unwrap());
        assert_eq!(b.schema(), telemetry_schema());
        assert_eq!(b.num_rows(), 3);
        let cpu = col::<UInt64Array>(&b, "cpu_ns");
        assert_eq!(
            (cpu.value(0), cpu.is_null(1), cpu.value(2)),
            (1000, true, u64::MAX)
        );
        assert!(
            col::<UInt64Array>(&b, "wakeups").is_null(0),
            "null stays null, not 0"
        );
        assert!(!col::<BooleanArray>(&b, "available_in_deployment").value(0));
        assert_eq!(col::<UInt64Array>(&b, "seq").values().to_vec(), [0, 1, 2]);
        let hist = col::<ListArray>(&b, "runq_delay_hist_log2");
        assert_eq!(
            hist.value(2)
                .as_primitive::<arrow_array::types::UInt64Type>()
                .values()
                .to_vec(),
            [2, 0, 3]
        );
        assert!(hist.is_null(1));
        let blk = col::<ListArray>(&b, "blk_latency_hist_log2");
        assert_eq!(
            (blk.value_length(0), blk.is_null(0)),
            (0, false),
            "[] stays empty, not null"
        );
        let n = col::<UInt32Array>(&b, "net_by_if_entries");
        assert_eq!((n.value(0), n.is_null(1)), (2, true));
        let u = col::<UInt32Array>(&b, "kvm_userspace_exit_reasons_entries");
        assert_eq!(
            (u.value(0), u.is_null(1)),
            (0, true),
            "{{}} is 0 entries, null is null"
        );
        assert!(col::<UInt32Array>(&b, "blk_by_dev_entries").is_null(0));
    }

    #[test]
    fn keyed_objects_become_long_tables() {
        let rows: Vec<Row> = (0..3)
            .map(|s| fixture::row("01A", s, &["tap0", "sockets"]))
            .collect();
        let net = read_back(parquet_bytes(&side_batch(&SIDE_TABLES[0], &rows).unwrap()).unwrap());
        assert_eq!(net.schema(), side_schema(&SIDE_TABLES[0]));
        assert_eq!(net.num_rows(), 6);
        let ifs = col::<StringArray>(&net, "interface");
        let seqs = col::<UInt64Array>(&net, "seq");
        let tx = col::<UInt64Array>(&net, "tx_bytes");
        for i in 0..6 {
            let r = &rows[seqs.value(i) as usize];
            let c = r.m.net_by_if.as_ref().unwrap()[ifs.value(i)];
            assert_eq!(tx.value(i), c.tx_bytes);
            assert_eq!(
                col::<UInt64Array>(&net, "rx_packets").value(i),
                c.rx_packets
            );
        }
        // Key order within a row: sorted, as the JSONL object.
        assert_eq!((ifs.value(0), ifs.value(1)), ("sockets", "tap0"));
        let kvm = side_batch(&SIDE_TABLES[2], &rows).unwrap();
        assert_eq!(
            col::<UInt64Array>(&kvm, "count").values().to_vec(),
            [1, 2, 3]
        );
        let qmp: Vec<Row> = (0..2).map(|s| fixture::qmp_row("01A", s)).collect();
        let blk = side_batch(&SIDE_TABLES[1], &qmp).unwrap();
        assert_eq!(
            col::<UInt64Array>(&blk, "read_bytes").values().to_vec(),
            [0, 512]
        );
        assert_eq!(
            side_batch(&SIDE_TABLES[3], &rows).unwrap().num_rows(),
            0,
            "{{}} has no entries"
        );
    }

    #[test]
    fn episode_events_and_labels() {
        let data = tempfile::tempdir().unwrap();
        let dir = fixture::episode(data.path(), "01EP", 2, &["tap0"], true);
        let ep = Episode::read(&dir).unwrap();
        let b = read_back(parquet_bytes(&episode_batch(&ep).unwrap()).unwrap());
        assert_eq!(b.schema(), episodes_schema());
        let tags = col::<MapArray>(&b, "tags").value(0);
        let keys = tags.column(0).as_string::<i32>();
        let vals = tags.column(1).as_string::<i32>();
        assert_eq!(
            (keys.value(0), vals.value(0), keys.value(1), vals.value(1)),
            ("sample", "sha256:ab", "vm", "w10")
        );
        assert_eq!(col::<StringArray>(&b, "meta_json").value(0), ep.meta_text);
        assert!(col::<StringArray>(&b, "target_exe").is_null(0));
        let e = read_back(parquet_bytes(&events_batch(ep.id(), &ep.events).unwrap()).unwrap());
        assert_eq!(
            col::<StringArray>(&e, "data").value(0),
            r#"{"pid":7,"mode":"spawn"}"#
        );
        assert_eq!(col::<StringArray>(&e, "data").value(1), "{}");
        assert!(col::<UInt64Array>(&e, "seq").is_null(0));
        let l = read_back(parquet_bytes(&labels_batch(ep.id(), &ep.labels).unwrap()).unwrap());
        assert_eq!(col::<StringArray>(&l, "label").value(0), "boot");
    }

    #[test]
    fn the_same_batch_gives_the_same_bytes() {
        let rows: Vec<Row> = (0..50).map(|s| fixture::row("01A", s, &["tap0"])).collect();
        let a = parquet_bytes(&telemetry_batch(&rows).unwrap()).unwrap();
        let b = parquet_bytes(&telemetry_batch(&rows).unwrap()).unwrap();
        assert_eq!(a, b);
        let meta = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(a)).unwrap();
        let kv = meta
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .unwrap();
        assert!(
            kv.iter()
                .any(|k| k.key == "cis490.dataset_version" && k.value.as_deref() == Some("2"))
        );
    }
}
