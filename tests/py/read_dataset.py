"""Reads a cis490 Parquet dataset back for tests/tests/dataset.rs and prints
one JSON document on stdout.

  read_dataset.py local ROOT
      The dataset in directory ROOT, with pyarrow (every table whole, every
      file's schema, every file's SHA-256) and with DuckDB (per-source
      totals, side-table totals, the per-phase query of docs/data-model.md).
  read_dataset.py s3 ENDPOINT BUCKET PREFIX
      The same DuckDB queries over S3 (httpfs, from the duckdb-ext-httpfs
      package: no download at run time), restricted to the episodes whose
      manifest exists; plus every object's key and SHA-256 (boto3) and the
      manifests.
  read_dataset.py mkbucket ENDPOINT BUCKET
      Creates a bucket.

S3 credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_REGION.
"""

import glob
import hashlib
import json
import os
import sys

import duckdb

TABLES = [
    "telemetry",
    "net_by_if",
    "blk_by_dev",
    "kvm_exit_reasons",
    "kvm_userspace_exit_reasons",
    "episodes",
    "events",
    "labels",
]
PER_SOURCE = {"telemetry", "net_by_if", "blk_by_dev", "kvm_exit_reasons", "kvm_userspace_exit_reasons"}
ENVELOPE = {"episode_id", "t_mono_ns", "t_wall_ns", "interval_ns", "seq", "available_in_deployment"}

# The worked example of docs/data-model.md ("Querying the dataset"), as is.
PER_PHASE = """
WITH phases AS (
  SELECT episode_id, label AS phase, seq AS first_seq,
         lead(seq) OVER (PARTITION BY episode_id ORDER BY t_mono_ns) AS next_seq
  FROM labels
),
rows AS (
  SELECT t.episode_id, t.seq, t.cpu_ns, t.net_tx_bytes, t.net_rx_bytes, e.tags['sample'] AS sample
  FROM telemetry t JOIN episodes e USING (episode_id)
  WHERE t.source = 'ebpf'
)
SELECT r.sample, p.phase, r.episode_id, count(*) AS buckets,
       sum(r.cpu_ns) AS cpu_ns, sum(r.net_tx_bytes) AS net_tx_bytes,
       sum(r.net_rx_bytes) AS net_rx_bytes
FROM rows r JOIN phases p
  ON r.episode_id = p.episode_id AND r.seq >= p.first_seq
 AND (p.next_seq IS NULL OR r.seq < p.next_seq)
GROUP BY ALL
ORDER BY r.sample, p.phase
"""


def rows_of(con, sql):
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def duckdb_report(con, where_shipped=""):
    """Totals per (source, episode) of every UBIGINT measure, side-table
    totals per key, and the per-phase query."""
    cols = rows_of(con, "DESCRIBE telemetry")
    measures = [c["column_name"] for c in cols if c["column_type"] == "UBIGINT" and c["column_name"] not in ENVELOPE]
    sums = ", ".join(f'sum("{m}") AS "{m}"' for m in measures)
    totals = {}
    for r in rows_of(con, f"SELECT source, episode_id, count(*) AS rows, {sums} FROM telemetry {where_shipped} GROUP BY ALL"):
        totals.setdefault(r.pop("source"), {})[r.pop("episode_id")] = r
    side = {}
    for t in ["net_by_if", "blk_by_dev", "kvm_exit_reasons", "kvm_userspace_exit_reasons"]:
        cs = rows_of(con, f"DESCRIBE {t}")
        key = cs[2]["column_name"]
        counters = [c["column_name"] for c in cs[3:] if c["column_name"] not in ("source", "date", "host")]
        sel = ", ".join(f'sum("{c}") AS "{c}"' for c in counters)
        for r in rows_of(con, f'SELECT source, episode_id, "{key}" AS k, {sel} FROM {t} {where_shipped} GROUP BY ALL'):
            side.setdefault(t, {}).setdefault(r.pop("source"), {}).setdefault(r.pop("episode_id"), {})[r.pop("k")] = r
    schemas = {t: [[c["column_name"], c["column_type"]] for c in rows_of(con, f"DESCRIBE {t}")] for t in TABLES}
    phases = rows_of(con, PER_PHASE)
    episodes = rows_of(con, f"SELECT episode_id, host, CAST(date AS VARCHAR) AS date, tags, dataset_version FROM episodes {where_shipped}")
    for e in episodes:
        e["tags"] = dict(e["tags"])
    return {"totals": totals, "side": side, "schemas": schemas, "per_phase": phases, "episodes": episodes}


def views(con, base, where=""):
    for t in TABLES:
        glob_ = f"{base}/{t}/" + ("*/" if t in PER_SOURCE else "") + "*/*/*.parquet"
        con.execute(f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{glob_}', hive_partitioning = true) {where}")


def local(root):
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    con = duckdb.connect()
    views(con, root)
    out = {"duckdb": duckdb_report(con)}
    tables, schemas, files = {}, {}, {}
    for t in TABLES:
        d = ds.dataset(os.path.join(root, t), format="parquet", partitioning="hive")
        tbl = d.to_table()
        tables[t] = tbl.to_pylist()
        for f in sorted(glob.glob(os.path.join(root, t, "**", "*.parquet"), recursive=True)):
            s = pq.read_schema(f).remove_metadata()
            schemas.setdefault(t, set()).add(str(s))
            with open(f, "rb") as fh:
                files[os.path.relpath(f, root)] = hashlib.sha256(fh.read()).hexdigest()
    out["pyarrow"] = tables
    out["file_schemas"] = {t: sorted(s) for t, s in schemas.items()}
    out["files"] = files
    return out


def s3_client(endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION", "us-east-1"))


def httpfs_path():
    import duckdb_ext

    base = list(duckdb_ext.__path__)[0]
    hits = glob.glob(os.path.join(base, "extensions", "v" + duckdb.__version__, "*", "httpfs.duckdb_extension"))
    if not hits:
        sys.exit(f"no httpfs extension for DuckDB {duckdb.__version__} under {base}")
    return hits[0]


def s3(endpoint, bucket, prefix):
    c = s3_client(endpoint)
    objects = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            body = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            objects[o["Key"][len(prefix) + 1 :]] = hashlib.sha256(body).hexdigest()
    manifests = {}
    for k in objects:
        if k.startswith("manifests/"):
            body = c.get_object(Bucket=bucket, Key=f"{prefix}/{k}")["Body"].read()
            manifests[k] = json.loads(body)
    out = {"objects": objects, "manifests": manifests}
    if manifests:
        con = duckdb.connect()
        con.execute(f"LOAD '{httpfs_path()}'")
        host = endpoint.split("://", 1)[1]
        con.execute(
            f"""CREATE SECRET s3 (TYPE s3, KEY_ID '{os.environ["AWS_ACCESS_KEY_ID"]}',
                SECRET '{os.environ["AWS_SECRET_ACCESS_KEY"]}', REGION '{os.environ.get("AWS_REGION", "us-east-1")}',
                ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false)"""
        )
        base = f"s3://{bucket}/{prefix}"
        # Only shipped episodes: those with a manifest.
        con.execute(f"CREATE VIEW shipped AS SELECT episode_id FROM read_json_auto('{base}/manifests/*.json')")
        views(con, base, "WHERE episode_id IN (SELECT episode_id FROM shipped)")
        out["duckdb"] = duckdb_report(con)
    return out


def main():
    mode = sys.argv[1]
    if mode == "local":
        out = local(sys.argv[2])
    elif mode == "s3":
        out = s3(*sys.argv[2:5])
    elif mode == "mkbucket":
        s3_client(sys.argv[2]).create_bucket(Bucket=sys.argv[3])
        out = {"created": sys.argv[3]}
    else:
        sys.exit(f"unknown mode {mode}")
    json.dump(out, sys.stdout, default=str)


if __name__ == "__main__":
    main()
