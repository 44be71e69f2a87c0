//! `cis490 ship --data-dir DIR --to s3://BUCKET/PREFIX | DIR`: every
//! complete episode of a data directory that is not shipped yet, exported
//! ([`super::export::build`]) and uploaded, each object read back and its
//! SHA-256 compared, then the episode's manifest
//! (`PREFIX/manifests/<episode>.json`: every file's key, size and SHA-256)
//! written **last**. An episode is shipped exactly when its manifest exists;
//! readers go by the manifests, never by the data files alone.
//!
//! Resumable: a shipper killed mid-episode left some data files and no
//! manifest; the next run builds the same bytes again (export is
//! deterministic), keeps the objects already there with the right SHA-256,
//! uploads the rest, and writes the manifest. `--delete-local` removes a
//! local episode only after its upload was verified (or, for one shipped
//! before, after every object of its manifest was read back and checked).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, Result, bail};
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload, aws::AmazonS3Builder};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{
    DATASET_VERSION, Episode, episode_dirs,
    export::{self, DatasetFile},
    is_complete,
};
use crate::episode::DONE;

/// Where shipped episodes go: a bucket under a prefix, or a directory.
/// (Driven by a current-thread runtime: the futures need not be `Send`.)
#[allow(async_fn_in_trait)]
pub trait Store {
    /// Writes `bytes` at `key` (relative to the destination root), whole.
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()>;
    /// The object at `key`, or `None` when there is none.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// For messages: the destination.
    fn describe(&self) -> String;
}

/// An object store (S3) under a key prefix.
pub struct ObjectDest {
    pub store: Arc<dyn ObjectStore>,
    pub bucket: String,
    pub prefix: String,
}

impl ObjectDest {
    fn path(&self, key: &str) -> Result<object_store::path::Path> {
        let full = if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        };
        object_store::path::Path::parse(&full).with_context(|| format!("bad object key {full}"))
    }
}

impl Store for ObjectDest {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let p = self.path(key)?;
        match self.store.put(&p, PutPayload::from(bytes)).await {
            Ok(_) => Ok(()),
            Err(e) => bail!("cannot upload s3://{}/{p}: {}", self.bucket, brief(&e)),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let p = self.path(key)?;
        let got = match self.store.get(&p).await {
            Ok(r) => r.bytes().await,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => Err(e),
        };
        match got {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(e) => bail!("cannot read s3://{}/{p}: {}", self.bucket, brief(&e)),
        }
    }

    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
            .trim_end_matches('/')
            .to_owned()
    }
}

/// An object store error on one line: the S3 error code and message when
/// the store sent one, else its first part and the innermost cause
/// (`Connection refused`...). object_store's own text nests each cause in
/// its parent's, XML bodies included.
fn brief(e: &object_store::Error) -> String {
    let text = e.to_string();
    let tag = |t: &str| {
        let rest = text.split(&format!("<{t}>")).nth(1)?;
        rest.split(&format!("</{t}>")).next()
    };
    if let Some(code) = tag("Code") {
        return format!(
            "S3 error {code}: {}",
            tag("Message").unwrap_or("(no message)")
        );
    }
    // The first line, up to object_store's "  - " before a nested cause.
    let head = |t: &str| {
        let line = t.lines().next().unwrap_or_default();
        line.split("  - ").next().unwrap_or(line).to_owned()
    };
    let first = head(&text);
    let mut root: &dyn std::error::Error = e;
    while let Some(s) = root.source() {
        root = s;
    }
    let root = head(&root.to_string());
    if first.contains(&root) {
        first.to_owned()
    } else {
        format!("{first}: {root}")
    }
}

/// A local directory: files written atomically (temp file, fsync, rename).
pub struct DirDest(pub PathBuf);

impl Store for DirDest {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        export::write_file(
            &self.0,
            &DatasetFile {
                key: key.to_owned(),
                bytes,
            },
        )?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let p = self.0.join(key);
        match fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    fn describe(&self) -> String {
        self.0.display().to_string()
    }
}

/// One file of a shipped episode, as its manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub key: String,
    pub bytes: u64,
    pub sha256: String,
}

/// `manifests/<episode>.json`: written after every file of the episode was
/// uploaded and verified. No timestamps: the same episode gives the same
/// manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub dataset_version: u32,
    pub episode_id: String,
    pub date: String,
    pub host: String,
    pub files: Vec<ManifestFile>,
}

pub fn manifest_key(episode_id: &str) -> String {
    format!("manifests/{episode_id}.json")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Manifest {
    pub fn of(ep: &Episode, files: &[DatasetFile]) -> Self {
        Self {
            dataset_version: DATASET_VERSION,
            episode_id: ep.id().to_owned(),
            date: ep.date(),
            host: ep.host(),
            files: files
                .iter()
                .map(|f| ManifestFile {
                    key: f.key.clone(),
                    bytes: f.bytes.len() as u64,
                    sha256: sha256_hex(&f.bytes),
                })
                .collect(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(self).expect("a manifest serializes");
        b.push(b'\n');
        b
    }
}

/// Reads `key` back and checks its size and SHA-256.
async fn verify<S: Store>(store: &S, key: &str, bytes: u64, sha256: &str) -> Result<()> {
    let Some(got) = store.get(key).await? else {
        bail!("{}/{key} is missing after upload", store.describe());
    };
    let sha = sha256_hex(&got);
    if got.len() as u64 != bytes || sha != sha256 {
        bail!(
            "{}/{key} does not verify: {} bytes, SHA-256 {sha}; expected {bytes} bytes, {sha256}",
            store.describe(),
            got.len()
        );
    }
    Ok(())
}

/// What shipping one episode did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shipped {
    /// A manifest was there already.
    pub already: bool,
    /// Objects uploaded now.
    pub uploaded: usize,
    /// Objects found there already with the right SHA-256 (a resumed
    /// episode).
    pub kept: usize,
    pub bytes: u64,
    pub deleted_local: bool,
}

/// Removes a shipped local episode: `done.marker` first (so a crash
/// midway leaves an incomplete episode, which is never shipped again),
/// then the directory.
fn delete_local(dir: &Path) -> Result<()> {
    fs::remove_file(dir.join(DONE))
        .with_context(|| format!("cannot remove {}/{DONE}", dir.display()))?;
    fs::File::open(dir).and_then(|d| d.sync_all()).ok();
    fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))
}

/// Ships one complete episode (see the module doc). `progress` gets one
/// line per object.
pub async fn ship_episode<S: Store>(
    store: &S,
    dir: &Path,
    delete: bool,
    progress: &mut dyn FnMut(String),
) -> Result<Shipped> {
    // Only meta.json until the manifest is known to be missing: a data
    // directory of shipped episodes costs a read of each meta.json.
    let (meta, _) = Episode::read_meta(dir)?;
    let mkey = manifest_key(&meta.id);
    let mut out = Shipped::default();
    if let Some(existing) = store.get(&mkey).await? {
        out.already = true;
        if delete {
            let m: Manifest = serde_json::from_slice(&existing)
                .with_context(|| format!("{}/{mkey} is not a manifest", store.describe()))?;
            for f in &m.files {
                verify(store, &f.key, f.bytes, &f.sha256).await?;
            }
            delete_local(dir)?;
            out.deleted_local = true;
        }
        return Ok(out);
    }
    let ep = Episode::read(dir)?;
    let files = export::build(&ep)?;
    let manifest = Manifest::of(&ep, &files);
    for (f, m) in files.into_iter().zip(&manifest.files) {
        out.bytes += m.bytes;
        // Resumed: an object a killed run uploaded is kept if it is whole.
        let there = store.get(&f.key).await?;
        if there.is_some_and(|b| b.len() as u64 == m.bytes && sha256_hex(&b) == m.sha256) {
            out.kept += 1;
            progress(format!("kept {} (already there, SHA-256 verified)", f.key));
            continue;
        }
        store.put(&f.key, f.bytes).await?;
        verify(store, &m.key, m.bytes, &m.sha256).await?;
        out.uploaded += 1;
        progress(format!(
            "put {} ({} bytes, SHA-256 verified)",
            m.key, m.bytes
        ));
    }
    let mbytes = manifest.to_bytes();
    store.put(&mkey, mbytes.clone()).await?;
    verify(store, &mkey, mbytes.len() as u64, &sha256_hex(&mbytes)).await?;
    progress(format!("put {mkey} (manifest, last)"));
    if delete {
        delete_local(dir)?;
        out.deleted_local = true;
    }
    Ok(out)
}

/// Ships every complete episode of `data_dir`, one after the other. An
/// incomplete one is skipped (said on stderr); an episode that fails is
/// reported and the others still shipped; any failure fails the run.
pub async fn ship_all<S: Store>(store: &S, data_dir: &Path, delete: bool) -> Result<()> {
    let dirs = episode_dirs(data_dir)?;
    let total = dirs.len();
    let (mut failed, mut incomplete) = (0, 0);
    for (i, dir) in dirs.iter().enumerate() {
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let at = format!("ship [{}/{total}] {name}", i + 1);
        if !is_complete(dir) {
            incomplete += 1;
            eprintln!("{at}: skipped: not complete (no {DONE})");
            continue;
        }
        let mut progress = |line: String| eprintln!("{at}: {line}");
        match ship_episode(store, dir, delete, &mut progress).await {
            Ok(s) if s.already => eprintln!(
                "{at}: already shipped (manifest present){}",
                if s.deleted_local {
                    "; verified again, local copy deleted"
                } else {
                    ""
                }
            ),
            Ok(s) => eprintln!(
                "{at}: shipped to {}: {} objects uploaded, {} kept from an earlier run, {} bytes{}",
                store.describe(),
                s.uploaded,
                s.kept,
                s.bytes,
                if s.deleted_local {
                    "; local copy deleted"
                } else {
                    ""
                }
            ),
            Err(e) => {
                failed += 1;
                eprintln!("{at}: failed: {e:#}");
            }
        }
    }
    eprintln!(
        "ship: {total} episode directories, {incomplete} incomplete (skipped), {failed} failed"
    );
    if failed > 0 {
        bail!("{failed} of {total} episodes could not be shipped (see above)");
    }
    Ok(())
}

/// `--to`: `s3://BUCKET[/PREFIX]`, or a directory (`file://` optional).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    S3 { bucket: String, prefix: String },
    Dir(PathBuf),
}

impl std::str::FromStr for Destination {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("'{s}' names no bucket (s3://BUCKET/PREFIX)"));
            }
            let prefix = prefix.trim_matches('/').to_owned();
            if !prefix.is_empty() {
                object_store::path::Path::parse(&prefix)
                    .map_err(|e| format!("bad prefix '{prefix}': {e}"))?;
            }
            return Ok(Self::S3 {
                bucket: bucket.to_owned(),
                prefix,
            });
        }
        let path = s.strip_prefix("file://").unwrap_or(s);
        if path.is_empty() || (path.contains("://") && !s.starts_with("file://")) {
            return Err(format!(
                "'{s}' is neither s3://BUCKET/PREFIX nor a directory"
            ));
        }
        Ok(Self::Dir(PathBuf::from(path)))
    }
}

/// `[section]` -> key -> value of an AWS-style INI file.
fn read_ini(text: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.trim().to_owned();
        } else if let Some((k, v)) = line.split_once('=') {
            out.entry(section.clone())
                .or_default()
                .insert(k.trim().to_owned(), v.trim().to_owned());
        }
    }
    out
}

/// Credentials and region of the AWS profile (`AWS_PROFILE`, else
/// `default`) from `~/.aws/credentials` and `~/.aws/config` (or
/// `AWS_SHARED_CREDENTIALS_FILE` / `AWS_CONFIG_FILE`), as
/// `(config key, value)` pairs for the builder.
fn profile_settings(
    env: impl Fn(&str) -> Option<String>,
) -> Vec<(object_store::aws::AmazonS3ConfigKey, String)> {
    use object_store::aws::AmazonS3ConfigKey as K;
    let home = env("HOME").unwrap_or_default();
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".to_owned());
    let file = |var: &str, leaf: &str| {
        let p = env(var).unwrap_or_else(|| format!("{home}/.aws/{leaf}"));
        read_ini(&fs::read_to_string(p).unwrap_or_default())
    };
    let mut out = Vec::new();
    if let Some(c) = file("AWS_SHARED_CREDENTIALS_FILE", "credentials").get(&profile) {
        for (name, key) in [
            ("aws_access_key_id", K::AccessKeyId),
            ("aws_secret_access_key", K::SecretAccessKey),
            ("aws_session_token", K::Token),
        ] {
            if let Some(v) = c.get(name) {
                out.push((key, v.clone()));
            }
        }
    }
    let section = if profile == "default" {
        profile.clone()
    } else {
        format!("profile {profile}")
    };
    if let Some(region) = file("AWS_CONFIG_FILE", "config")
        .get(&section)
        .and_then(|c| c.get("region"))
    {
        out.push((K::Region, region.clone()));
    }
    out
}

/// The S3 store: the `AWS_*` environment variables first (access key,
/// secret, session token, region, endpoint), then the profile files for
/// what they leave unset; `--endpoint` over all (plain `http://` allowed
/// for it).
pub fn s3_store(bucket: &str, endpoint: Option<&str>) -> Result<Arc<dyn ObjectStore>> {
    use object_store::aws::AmazonS3ConfigKey as K;
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let env_has = |key: &K| match key {
        K::AccessKeyId | K::SecretAccessKey | K::Token => env("AWS_ACCESS_KEY_ID").is_some(),
        K::Region => env("AWS_REGION").is_some() || env("AWS_DEFAULT_REGION").is_some(),
        _ => true,
    };
    for (k, v) in profile_settings(env) {
        if !env_has(&k) {
            b = b.with_config(k, v);
        }
    }
    if let Some(url) = endpoint {
        b = b
            .with_endpoint(url)
            .with_allow_http(url.starts_with("http://"));
    }
    Ok(Arc::new(b.build().context("cannot set up the S3 client")?))
}

/// `cis490 ship`.
pub fn run(data_dir: &Path, to: &Destination, endpoint: Option<&str>, delete: bool) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match to {
        Destination::S3 { bucket, prefix } => {
            let store = ObjectDest {
                store: s3_store(bucket, endpoint)?,
                bucket: bucket.clone(),
                prefix: prefix.clone(),
            };
            rt.block_on(ship_all(&store, data_dir, delete))
        }
        Destination::Dir(d) => {
            if endpoint.is_some() {
                bail!("--endpoint is for s3:// destinations");
            }
            fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            rt.block_on(ship_all(&DirDest(d.clone()), data_dir, delete))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::dataset::fixture;

    /// An in-memory store that logs its puts and can fail the n-th one
    /// (a crash or a network error mid-episode) or store it torn.
    #[derive(Default)]
    struct MemStore {
        objects: RefCell<BTreeMap<String, Vec<u8>>>,
        puts: RefCell<Vec<String>>,
        fail_put: Option<usize>,
        tear_put: Option<usize>,
    }

    impl Store for MemStore {
        async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
            let n = self.puts.borrow().len();
            self.puts.borrow_mut().push(key.to_owned());
            if self.fail_put == Some(n) {
                bail!("connection reset");
            }
            let bytes = if self.tear_put == Some(n) {
                bytes[..bytes.len() / 2].to_vec()
            } else {
                bytes
            };
            self.objects.borrow_mut().insert(key.to_owned(), bytes);
            Ok(())
        }
        async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
            Ok(self.objects.borrow().get(key).cloned())
        }
        fn describe(&self) -> String {
            "mem".into()
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn ship(store: &MemStore, dir: &Path, delete: bool) -> Result<Shipped> {
        block_on(ship_episode(store, dir, delete, &mut |_| {}))
    }

    /// What export builds for the episode, by key.
    fn built(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        let ep = Episode::read(dir).unwrap();
        export::build(&ep)
            .unwrap()
            .into_iter()
            .map(|f| (f.key, f.bytes))
            .collect()
    }

    #[test]
    fn the_manifest_is_written_last_and_lists_every_file() {
        let data = tempfile::tempdir().unwrap();
        let dir = fixture::episode(data.path(), "01EP", 3, &["tap0"], true);
        let store = MemStore::default();
        let s = ship(&store, &dir, false).unwrap();
        let files = built(&dir);
        // 2 sources x 5 tables + episodes, events, labels.
        assert_eq!(files.len(), 13);
        assert_eq!((s.uploaded, s.kept, s.already), (13, 0, false));
        let puts = store.puts.borrow();
        assert_eq!(puts.last().unwrap(), "manifests/01EP.json");
        assert_eq!(puts.len(), 14, "each object once");
        let m: Manifest =
            serde_json::from_slice(&store.objects.borrow()["manifests/01EP.json"]).unwrap();
        assert_eq!(
            (m.dataset_version, m.episode_id.as_str(), m.host.as_str()),
            (DATASET_VERSION, "01EP", "lab-03")
        );
        assert_eq!(m.files.len(), 13);
        for f in &m.files {
            assert_eq!(f.sha256, sha256_hex(&files[&f.key]));
            assert_eq!(store.objects.borrow()[&f.key], files[&f.key]);
        }
        assert!(dir.exists(), "kept without --delete-local");
        // Shipped: a second run uploads nothing.
        let again = ship(&store, &dir, false).unwrap();
        assert!(again.already);
        assert_eq!(store.puts.borrow().len(), 14);
    }

    #[test]
    fn a_failed_upload_leaves_no_manifest_and_the_next_run_resumes() {
        let data = tempfile::tempdir().unwrap();
        let dir = fixture::episode(data.path(), "01EP", 3, &["tap0"], true);
        let store = MemStore {
            fail_put: Some(5),
            ..Default::default()
        };
        let err = ship(&store, &dir, true).unwrap_err();
        assert!(format!("{err:#}").contains("connection reset"), "{err:#}");
        assert_eq!(store.objects.borrow().len(), 5);
        assert!(!store.objects.borrow().contains_key("manifests/01EP.json"));
        assert!(dir.exists(), "not deleted: the upload failed");
        // The next run: the 5 objects there are kept, the other 8 uploaded.
        let store = MemStore {
            objects: store.objects,
            ..Default::default()
        };
        let s = ship(&store, &dir, false).unwrap();
        assert_eq!((s.kept, s.uploaded), (5, 8));
        let mut want = built(&dir);
        let m = store.objects.borrow()["manifests/01EP.json"].clone();
        want.insert("manifests/01EP.json".into(), m);
        assert_eq!(*store.objects.borrow(), want);
    }

    #[test]
    fn a_torn_object_is_caught_and_uploaded_again() {
        let data = tempfile::tempdir().unwrap();
        let dir = fixture::episode(data.path(), "01EP", 3, &["tap0"], true);
        // Read back after the upload: a torn object fails the episode.
        let store = MemStore {
            tear_put: Some(2),
            ..Default::default()
        };
        let err = format!("{:#}", ship(&store, &dir, false).unwrap_err());
        assert!(err.contains("does not verify"), "{err}");
        assert!(!store.objects.borrow().contains_key("manifests/01EP.json"));
        // Left behind by a crash: the next run replaces it.
        let store = MemStore {
            objects: store.objects,
            ..Default::default()
        };
        let s = ship(&store, &dir, false).unwrap();
        assert_eq!((s.kept, s.uploaded), (2, 11));
        let files = built(&dir);
        for (k, v) in files {
            assert_eq!(store.objects.borrow()[&k], v, "{k}");
        }
    }

    #[test]
    fn delete_local_only_after_a_verified_upload() {
        let data = tempfile::tempdir().unwrap();
        let dir = fixture::episode(data.path(), "01EP", 2, &["tap0"], true);
        let store = MemStore::default();
        ship(&store, &dir, false).unwrap();
        // Shipped earlier, but an object in the store no longer verifies:
        // the local copy stays.
        let key = built(&dir).into_keys().next().unwrap();
        store.objects.borrow_mut().get_mut(&key).unwrap()[0] ^= 1;
        let err = format!("{:#}", ship(&store, &dir, true).unwrap_err());
        assert!(err.contains("does not verify"), "{err}");
        assert!(dir.join(DONE).exists());
        // Whole again: verified, deleted.
        store.objects.borrow_mut().get_mut(&key).unwrap()[0] ^= 1;
        let s = ship(&store, &dir, true).unwrap();
        assert!(s.already && s.deleted_local);
        assert!(!dir.exists());
    }

    #[test]
    fn incomplete_episodes_are_never_shipped() {
        let data = tempfile::tempdir().unwrap();
        let half = fixture::episode(data.path(), "01HALF", 2, &["tap0"], false);
        let done = fixture::episode(data.path(), "01DONE", 2, &["tap1"], true);
        let store = MemStore::default();
        assert!(ship(&store, &half, false).is_err());
        block_on(ship_all(&store, data.path(), true)).unwrap();
        let keys: Vec<String> = store.objects.borrow().keys().cloned().collect();
        assert!(keys.iter().all(|k| !k.contains("01HALF")), "{keys:?}");
        assert!(keys.contains(&"manifests/01DONE.json".to_owned()));
        assert!(half.exists() && !done.exists());
    }

    #[test]
    fn a_directory_destination_gets_the_same_files() {
        let data = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let dir = fixture::episode(data.path(), "01EP", 2, &["tap0"], true);
        block_on(ship_all(
            &DirDest(out.path().to_owned()),
            data.path(),
            false,
        ))
        .unwrap();
        for (k, v) in built(&dir) {
            assert_eq!(fs::read(out.path().join(&k)).unwrap(), v, "{k}");
        }
        assert!(out.path().join("manifests/01EP.json").exists());
    }

    #[test]
    fn store_errors_are_one_line() {
        let io = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let e = object_store::Error::Generic {
            store: "S3",
            source: format!(
                "Error performing GET http://h/b/k after 10 retries  - HTTP error: {io}\nmore"
            )
            .into(),
        };
        assert_eq!(
            brief(&e),
            "Generic S3 error: Error performing GET http://h/b/k after 10 retries"
        );
        let e = object_store::Error::Generic {
            store: "S3",
            source: Box::new(io),
        };
        assert_eq!(
            brief(&e),
            "Generic S3 error: Connection refused (os error 111)"
        );
        let xml = "404: <?xml version=\"1.0\"?>\n<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>";
        let e = object_store::Error::Generic {
            store: "S3",
            source: xml.into(),
        };
        assert_eq!(
            brief(&e),
            "S3 error NoSuchBucket: The specified bucket does not exist"
        );
    }

    #[test]
    fn destinations_parse() {
        let d = |s: &str| s.parse::<Destination>();
        assert_eq!(
            d("s3://b").unwrap(),
            Destination::S3 {
                bucket: "b".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            d("s3://b/x/y/").unwrap(),
            Destination::S3 {
                bucket: "b".into(),
                prefix: "x/y".into()
            }
        );
        assert_eq!(d("/srv/ds").unwrap(), Destination::Dir("/srv/ds".into()));
        assert_eq!(
            d("file:///srv/ds").unwrap(),
            Destination::Dir("/srv/ds".into())
        );
        assert!(d("s3://").is_err());
        assert!(d("gs://b/x").is_err());
        assert!(d("").is_err());
    }

    #[test]
    fn profile_files_give_credentials_and_region() {
        use object_store::aws::AmazonS3ConfigKey as K;
        let home = tempfile::tempdir().unwrap();
        fs::create_dir(home.path().join(".aws")).unwrap();
        fs::write(
            home.path().join(".aws/credentials"),
            "[default]\naws_access_key_id = AKDEF\naws_secret_access_key = sdef\n\n\
             [lab]\n# comment\naws_access_key_id=AKLAB\naws_secret_access_key=slab\naws_session_token=tok\n",
        )
        .unwrap();
        fs::write(
            home.path().join(".aws/config"),
            "[default]\nregion = eu-west-1\n[profile lab]\nregion=us-east-2\n",
        )
        .unwrap();
        let h = home.path().display().to_string();
        let env = |profile: Option<&'static str>| {
            let h = h.clone();
            move |k: &str| match k {
                "HOME" => Some(h.clone()),
                "AWS_PROFILE" => profile.map(str::to_owned),
                _ => None,
            }
        };
        let got = |p| {
            profile_settings(env(p))
                .into_iter()
                .map(|(k, v)| (format!("{k:?}"), v))
                .collect::<Vec<_>>()
        };
        let want = |v: &[(K, &str)]| {
            v.iter()
                .map(|(k, s)| (format!("{k:?}"), s.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            got(None),
            want(&[
                (K::AccessKeyId, "AKDEF"),
                (K::SecretAccessKey, "sdef"),
                (K::Region, "eu-west-1")
            ])
        );
        assert_eq!(
            got(Some("lab")),
            want(&[
                (K::AccessKeyId, "AKLAB"),
                (K::SecretAccessKey, "slab"),
                (K::Token, "tok"),
                (K::Region, "us-east-2")
            ])
        );
        assert!(got(Some("nope")).is_empty());
    }
}
