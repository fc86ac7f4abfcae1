//! The object store behind one interface: a local directory (default) or any S3-compatible
//! bucket, both through `object_store`. A local `put` is written by hand so it is durable
//! before we acknowledge it: temp file, fsync, rename, fsync of the directory.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt as _;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};

use crate::config::S3Config;

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("bad store URL {0:?}: expected file://DIR or s3://BUCKET")]
    BadUrl(String),
    #[error("cannot prepare local store {path}: {source}")]
    LocalDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("object {key}: {source}")]
    Io { key: String, source: std::io::Error },
    #[error("object store task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("bad S3 endpoint {0:?}: expected http://HOST[:PORT] or https://HOST[:PORT]")]
    BadEndpoint(String),
    #[error("{0}: the bucket does not exist (create it first)")]
    NoBucket(String),
    #[error("{store}: cannot list the bucket: {source}")]
    Unusable {
        store: String,
        source: object_store::Error,
    },
}

/// Where recordings' objects live. Cheap to clone.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    /// Set for a local directory: puts go through [`durable_write`].
    local_root: Option<PathBuf>,
    describe: String,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

/// Where a store URL points.
enum Target<'a> {
    Dir(PathBuf),
    Bucket(&'a str),
}

impl<'a> Target<'a> {
    fn of(url: &'a str) -> Result<Self, ObjectError> {
        if let Some(dir) = url.strip_prefix("file://") {
            let root = PathBuf::from(dir);
            if !dir.is_empty() && root.is_absolute() {
                return Ok(Target::Dir(root));
            }
        } else if let Some(bucket) = url.strip_prefix("s3://") {
            let bucket = bucket.trim_end_matches('/');
            if !bucket.is_empty() && !bucket.contains('/') {
                return Ok(Target::Bucket(bucket));
            }
        }
        Err(ObjectError::BadUrl(url.to_string()))
    }
}

impl Objects {
    /// Whether `url` names a store [`open`](Self::open) can open, without touching it.
    pub fn check_url(url: &str) -> Result<(), ObjectError> {
        Target::of(url).map(|_| ())
    }

    /// Opens `file://DIR` (created when missing) or `s3://BUCKET`.
    pub fn open(url: &str, s3: &S3Config) -> Result<Objects, ObjectError> {
        match Target::of(url)? {
            Target::Dir(root) => Self::open_dir(root),
            Target::Bucket(bucket) => Self::open_bucket(bucket, s3),
        }
    }

    fn open_dir(root: PathBuf) -> Result<Objects, ObjectError> {
        std::fs::create_dir_all(&root).map_err(|source| ObjectError::LocalDir {
            path: root.clone(),
            source,
        })?;
        let fs = LocalFileSystem::new_with_prefix(&root)?.with_automatic_cleanup(true);
        Ok(Objects {
            store: Arc::new(fs),
            describe: format!("file://{}", root.display()),
            local_root: Some(root),
        })
    }

    fn open_bucket(bucket: &str, s3: &S3Config) -> Result<Objects, ObjectError> {
        // A store that does not answer fails a request within about a minute (object_store's
        // defaults retry for up to 3 minutes): the agent's own timeout is 60 s and it retries
        // by itself, and a sweep holding rows must not wait that long.
        let retry = object_store::RetryConfig {
            max_retries: 3,
            retry_timeout: std::time::Duration::from_secs(30),
            ..Default::default()
        };
        let client = object_store::ClientOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(5))
            .with_timeout(std::time::Duration::from_secs(25));
        let mut b = AmazonS3Builder::new()
            .with_retry(retry)
            .with_client_options(client)
            .with_bucket_name(bucket)
            .with_region(s3.region.clone().unwrap_or_else(|| "auto".to_string()));
        if let Some(ep) = &s3.endpoint {
            // object_store panics on an endpoint it cannot make a request of (no scheme, a
            // space): said here as a configuration error instead.
            let ok = ep.parse::<axum::http::Uri>().ok().is_some_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.host().is_some_and(|h| !h.is_empty())
            });
            if !ok {
                return Err(ObjectError::BadEndpoint(ep.clone()));
            }
            // R2, MinIO, Garage and test servers on loopback take path-style requests;
            // plain http is allowed only because the operator wrote an http:// endpoint.
            b = b
                .with_endpoint(ep.clone())
                .with_virtual_hosted_style_request(false)
                .with_allow_http(ep.starts_with("http://"));
        }
        if let Some(k) = &s3.access_key {
            b = b.with_access_key_id(k.clone());
        }
        if let Some(k) = &s3.secret_key {
            b = b.with_secret_access_key(k.clone());
        }
        Ok(Objects {
            store: Arc::new(b.build()?),
            local_root: None,
            describe: format!("s3://{bucket}"),
        })
    }

    /// Whether the store answers: a bucket that is missing, or credentials it refuses, are found
    /// at `serve`'s start rather than at the first upload. (A list: an object's HEAD answers 404
    /// alike for a missing key and a missing bucket.)
    pub async fn check(&self) -> Result<(), ObjectError> {
        if self.local_root.is_some() {
            return Ok(());
        }
        match self
            .store
            .list_with_delimiter(Some(&Path::from("recordings")))
            .await
        {
            Ok(_) => Ok(()),
            // object_store keeps a list's HTTP status in its message only: a 404 to a list is
            // a missing bucket (S3, R2, MinIO and Garage also name `NoSuchBucket`).
            Err(e)
                if matches!(e, object_store::Error::NotFound { .. })
                    || e.to_string().contains("status code: 404")
                    || e.to_string().contains("NoSuchBucket") =>
            {
                Err(ObjectError::NoBucket(self.describe.clone()))
            }
            Err(source) => Err(ObjectError::Unusable {
                store: self.describe.clone(),
                source,
            }),
        }
    }

    /// Stores `data` at `key`. Returns only once the object is durable.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<(), ObjectError> {
        match &self.local_root {
            Some(root) => {
                let path = root.join(key);
                let key = key.to_string();
                tokio::task::spawn_blocking(move || {
                    // A `delete` of the recording may remove the directory between our
                    // creating it and renaming into it: write again (the caller then finds
                    // the recording gone and takes the object back).
                    let mut tries = 0;
                    loop {
                        match durable_write(&path, &data) {
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 3 => {
                                tries += 1
                            }
                            r => return r,
                        }
                    }
                })
                .await?
                .map_err(|source| ObjectError::Io { key, source })
            }
            None => {
                self.store
                    .put(&Path::from(key), PutPayload::from_bytes(data))
                    .await?;
                Ok(())
            }
        }
    }

    /// The object at `key` as a stream of pieces (what the store hands out at a time), or
    /// `None` when there is none: a reader that takes its time holds a piece, not the object.
    pub async fn get_stream(
        &self,
        key: &str,
    ) -> Result<Option<futures::stream::BoxStream<'static, Result<Bytes, ObjectError>>>, ObjectError>
    {
        use futures::StreamExt as _;
        match self.store.get(&Path::from(key)).await {
            Ok(r) => Ok(Some(r.into_stream().map_err(ObjectError::from).boxed())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether there is an object at `key` (a HEAD, nothing read).
    pub async fn exists(&self, key: &str) -> Result<bool, ObjectError> {
        match self.store.head(&Path::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// What this store is, for messages: `file://DIR` or `s3://BUCKET`.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// The object at `key`, or `None` when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, ObjectError> {
        match self.store.get(&Path::from(key)).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The size of every object under `prefix` (a `dir/` style prefix), by key, without
    /// reading them: one listing, not a request per object.
    pub async fn sizes(
        &self,
        prefix: &str,
    ) -> Result<std::collections::HashMap<String, u64>, ObjectError> {
        let prefix = Path::from(prefix.trim_end_matches('/'));
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        Ok(metas
            .into_iter()
            .map(|m| (m.location.to_string(), m.size))
            .collect())
    }

    /// Deletes `key`; an object that is already gone is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        match self.store.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes every object under `prefix` (a `dir/` style prefix).
    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), ObjectError> {
        let prefix = Path::from(prefix.trim_end_matches('/'));
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        for m in metas {
            match self.store.delete(&m.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Every object of one recording: its chunks and its summary. Safe to repeat.
    pub async fn delete_recording(&self, org: &str, session: &str) -> Result<(), ObjectError> {
        self.delete_prefix(&ztna_common::api::chunk_prefix(org, session))
            .await?;
        self.delete(&ztna_common::api::summary_key(org, session))
            .await
    }
}

/// Writes `data` to `path` so that it survives a crash once this returns: a temp file in the
/// same directory, fsynced, renamed over the target, then the directory fsynced (and the
/// parents of any directory created on the way).
fn durable_write(path: &FsPath, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("object path has no parent"))?;
    if !dir.is_dir() {
        // Remember the topmost directory we create so its parent's entry gets synced too.
        let mut missing = Vec::new();
        let mut d = dir;
        while !d.is_dir() {
            missing.push(d.to_path_buf());
            match d.parent() {
                Some(p) => d = p,
                None => break,
            }
        }
        std::fs::create_dir_all(dir)?;
        for m in missing.iter().rev() {
            if let Some(p) = m.parent() {
                crate::config::sync_dir(p)?;
            }
        }
    }
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("object path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        uuid::Uuid::new_v4()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        crate::config::sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint object_store cannot make a request of is a configuration error, not the
    /// panic it was (`request valid: InvalidUri`) at `serve`'s start.
    #[tokio::test]
    async fn an_unusable_s3_endpoint_is_refused_at_open() {
        for ep in [
            "abc.r2.cloudflarestorage.com",
            "127.0.0.1:9000",
            "http://h/ x",
            "ftp://h",
            "http://",
            "",
        ] {
            let s3 = S3Config {
                endpoint: Some(ep.to_string()),
                ..S3Config::default()
            };
            match Objects::open("s3://bkt", &s3) {
                Err(ObjectError::BadEndpoint(e)) => assert_eq!(e, ep),
                Err(e) => panic!("{ep}: {e}"),
                Ok(_) => panic!("{ep}: taken"),
            }
        }
        for ep in [
            "http://127.0.0.1:9000",
            "https://acct.r2.cloudflarestorage.com",
        ] {
            let s3 = S3Config {
                endpoint: Some(ep.to_string()),
                ..S3Config::default()
            };
            assert!(Objects::open("s3://bkt", &s3).is_ok(), "{ep}");
        }
    }

    #[tokio::test]
    async fn local_roundtrip_and_prefix_delete() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("objects").display());
        let o = Objects::open(&url, &S3Config::default()).unwrap();
        o.put("recordings/a/b/chunk-0.cast", Bytes::from_static(b"x\n"))
            .await
            .unwrap();
        o.put("recordings/a/b/chunk-1.cast", Bytes::from_static(b"y\n"))
            .await
            .unwrap();
        o.put(
            "session-recordings/a/b/recording.json",
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
        assert_eq!(
            o.get("recordings/a/b/chunk-1.cast").await.unwrap().unwrap(),
            Bytes::from_static(b"y\n")
        );
        o.delete_recording("a", "b").await.unwrap();
        assert!(o
            .get("recordings/a/b/chunk-0.cast")
            .await
            .unwrap()
            .is_none());
        assert!(o
            .get("session-recordings/a/b/recording.json")
            .await
            .unwrap()
            .is_none());
        o.delete_recording("a", "b").await.unwrap();
    }
}
