//! What the controller knows about Secrets without caching their data.
//!
//! One metadata-only watch of all Secrets feeds two small indexes:
//! - `managed`: resourceVersion, content hash and owner of every Secret vaultconn wrote (found
//!   by label), so a reconcile can see "already correct" without reading the Secret's data;
//! - `references`: which connections read which credentials Secret, so creating or editing a
//!   credentials Secret wakes exactly the connections that use it.
//!
//! kube-runtime's reflector would keep the metadata of every Secret in the cluster; this keeps
//! only what we need, so memory does not grow with unrelated Secrets.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;

use crate::api::VaultConnection;
use crate::names::*;

/// (namespace, name)
pub type Key = (String, String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedMeta {
    pub resource_version: String,
    pub content_hash: Option<String>,
    pub connection: Option<String>,
    pub connection_uid: Option<String>,
}

#[derive(Default)]
struct Inner {
    managed: HashMap<Key, ManagedMeta>,
    /// Secrets written or verified by this process: key → resourceVersion known to be correct.
    verified: HashMap<Key, String>,
    /// (namespace, secret) → connections reading it
    readers: HashMap<Key, BTreeSet<String>>,
    /// (namespace, connection) → secrets it reads
    reads: HashMap<Key, Vec<String>>,
    /// Managed Secrets seen during a watch re-list, swapped in at InitDone.
    relist: Option<HashMap<Key, ManagedMeta>>,
    /// The first list has completed: from then on, "not in `managed`" means "not ours".
    synced: bool,
}

#[derive(Default)]
pub struct SecretIndex {
    inner: Mutex<Inner>,
}

fn key_of(meta: &PartialObjectMeta<Secret>) -> Option<Key> {
    Some((
        meta.metadata.namespace.clone()?,
        meta.metadata.name.clone()?,
    ))
}

fn managed_meta(meta: &PartialObjectMeta<Secret>) -> Option<ManagedMeta> {
    let m = &meta.metadata;
    let managed = m
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY_VALUE);
    if !managed {
        return None;
    }
    let ann = m.annotations.as_ref();
    Some(ManagedMeta {
        resource_version: m.resource_version.clone().unwrap_or_default(),
        content_hash: ann.and_then(|a| a.get(CONTENT_HASH_ANNOTATION)).cloned(),
        connection: ann.and_then(|a| a.get(CONNECTION_ANNOTATION)).cloned(),
        connection_uid: ann.and_then(|a| a.get(CONNECTION_UID_ANNOTATION)).cloned(),
    })
}

impl SecretIndex {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        crate::sync::lock(&self.inner)
    }

    /// Record that `connection` reads `secrets` (replacing what it read before).
    pub fn set_reads(&self, namespace: &str, connection: &str, secrets: Vec<String>) {
        let mut inner = self.lock();
        let ck = (namespace.to_string(), connection.to_string());
        if inner.reads.get(&ck) == Some(&secrets) {
            return;
        }
        if let Some(old) = inner.reads.remove(&ck) {
            for s in old {
                let sk = (namespace.to_string(), s);
                if let Some(set) = inner.readers.get_mut(&sk) {
                    set.remove(connection);
                    if set.is_empty() {
                        inner.readers.remove(&sk);
                    }
                }
            }
        }
        for s in &secrets {
            inner
                .readers
                .entry((namespace.to_string(), s.clone()))
                .or_default()
                .insert(connection.to_string());
        }
        if !secrets.is_empty() {
            inner.reads.insert(ck, secrets);
        }
    }

    pub fn forget_connection(&self, namespace: &str, connection: &str) {
        self.set_reads(namespace, connection, vec![]);
    }

    /// Whether the watch's first list has completed. Before that, a Secret missing from the
    /// index may simply not have been listed yet.
    pub fn is_synced(&self) -> bool {
        self.lock().synced
    }

    pub fn managed(&self, namespace: &str, name: &str) -> Option<ManagedMeta> {
        self.lock()
            .managed
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// True when the Secret is known (from the watch) to be at a resourceVersion this process
    /// wrote or verified, for this connection, with the given content hash: nothing to do.
    pub fn is_verified(
        &self,
        namespace: &str,
        name: &str,
        connection_uid: &str,
        content_hash: &str,
    ) -> bool {
        let inner = self.lock();
        let k = (namespace.to_string(), name.to_string());
        match (inner.managed.get(&k), inner.verified.get(&k)) {
            (Some(m), Some(rv)) => {
                &m.resource_version == rv
                    && m.content_hash.as_deref() == Some(content_hash)
                    && m.connection_uid.as_deref() == Some(connection_uid)
            }
            _ => false,
        }
    }

    /// Remember that the Secret at `resource_version` holds what we want.
    pub fn mark_verified(&self, namespace: &str, name: &str, resource_version: Option<String>) {
        let mut inner = self.lock();
        let k = (namespace.to_string(), name.to_string());
        match resource_version {
            Some(rv) => {
                inner.verified.insert(k, rv);
            }
            None => {
                inner.verified.remove(&k);
            }
        }
    }

    /// Apply one watch event; returns the connections to reconcile.
    pub fn apply_event(
        &self,
        event: kube::runtime::watcher::Event<PartialObjectMeta<Secret>>,
    ) -> Vec<ObjectRef<VaultConnection>> {
        use kube::runtime::watcher::Event;
        let mut inner = self.lock();
        match event {
            Event::Init => {
                inner.relist = Some(HashMap::new());
                vec![]
            }
            Event::InitApply(obj) => {
                // During a re-list, only remember managed Secrets; a trigger per listed Secret
                // would reconcile everything on every watch restart.
                if let (Some(k), Some(m)) = (key_of(&obj), managed_meta(&obj)) {
                    let changed = inner.managed.get(&k) != Some(&m);
                    inner
                        .relist
                        .get_or_insert_with(HashMap::new)
                        .insert(k.clone(), m);
                    if changed {
                        return triggers_for(&inner, &k, &obj);
                    }
                }
                vec![]
            }
            Event::InitDone => {
                inner.synced = true;
                if let Some(fresh) = inner.relist.take() {
                    // Managed Secrets that vanished while the watch was down: their
                    // connections must recreate them.
                    let gone: Vec<Key> = inner
                        .managed
                        .keys()
                        .filter(|k| !fresh.contains_key(*k))
                        .cloned()
                        .collect();
                    let mut out = vec![];
                    for k in gone {
                        if let Some(c) = inner.managed.get(&k).and_then(|m| m.connection.clone()) {
                            out.push(ObjectRef::new(&c).within(&k.0));
                        }
                    }
                    inner.managed = fresh;
                    return out;
                }
                vec![]
            }
            Event::Apply(obj) => {
                let Some(k) = key_of(&obj) else { return vec![] };
                match managed_meta(&obj) {
                    Some(m) => {
                        inner.managed.insert(k.clone(), m);
                    }
                    None => {
                        inner.managed.remove(&k);
                    }
                }
                triggers_for(&inner, &k, &obj)
            }
            Event::Delete(obj) => {
                let Some(k) = key_of(&obj) else { return vec![] };
                inner.managed.remove(&k);
                inner.verified.remove(&k);
                triggers_for(&inner, &k, &obj)
            }
        }
    }
}

fn triggers_for(
    inner: &Inner,
    k: &Key,
    obj: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<VaultConnection>> {
    let mut out: Vec<ObjectRef<VaultConnection>> = inner
        .readers
        .get(k)
        .into_iter()
        .flatten()
        .map(|c| ObjectRef::new(c).within(&k.0))
        .collect();
    // A managed Secret at exactly the version this process wrote or verified is the echo of
    // our own write: waking its connection again would only re-read what we just wrote.
    let own_echo = obj.metadata.resource_version.is_some()
        && inner.verified.get(k) == obj.metadata.resource_version.as_ref();
    if let Some(conn) = managed_meta(obj).and_then(|m| m.connection) {
        if !own_echo {
            out.push(ObjectRef::new(&conn).within(&k.0));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;
    use std::collections::BTreeMap;

    fn meta(
        ns: &str,
        name: &str,
        rv: &str,
        managed_for: Option<&str>,
    ) -> PartialObjectMeta<Secret> {
        let mut m = PartialObjectMeta::<Secret>::default();
        m.metadata.namespace = Some(ns.into());
        m.metadata.name = Some(name.into());
        m.metadata.resource_version = Some(rv.into());
        if let Some(c) = managed_for {
            m.metadata.labels = Some(BTreeMap::from([(
                MANAGED_BY_LABEL.into(),
                MANAGED_BY_VALUE.into(),
            )]));
            m.metadata.annotations = Some(BTreeMap::from([
                (CONNECTION_ANNOTATION.into(), c.into()),
                (CONTENT_HASH_ANNOTATION.into(), "h1".into()),
                (CONNECTION_UID_ANNOTATION.into(), "u1".into()),
            ]));
        }
        m
    }

    #[test]
    fn credentials_secret_events_wake_their_readers_only() {
        let idx = SecretIndex::default();
        idx.set_reads("ns", "conn-a", vec!["creds".into()]);
        idx.set_reads("ns", "conn-b", vec!["creds".into(), "ca".into()]);
        let refs = idx.apply_event(Event::Apply(meta("ns", "creds", "1", None)));
        let names: Vec<_> = refs.iter().map(|r| r.name.clone()).collect();
        assert_eq!(names, vec!["conn-a", "conn-b"]);
        assert!(idx
            .apply_event(Event::Apply(meta("other", "creds", "1", None)))
            .is_empty());
        assert!(idx
            .apply_event(Event::Apply(meta("ns", "unrelated", "1", None)))
            .is_empty());
        idx.set_reads("ns", "conn-b", vec!["ca".into()]);
        assert_eq!(
            idx.apply_event(Event::Apply(meta("ns", "creds", "2", None)))
                .len(),
            1
        );
        idx.forget_connection("ns", "conn-a");
        assert!(idx
            .apply_event(Event::Apply(meta("ns", "creds", "3", None)))
            .is_empty());
    }

    #[test]
    fn managed_secrets_are_tracked_and_verified_by_resource_version() {
        let idx = SecretIndex::default();
        let refs = idx.apply_event(Event::Apply(meta("ns", "out", "5", Some("conn"))));
        assert_eq!(refs[0].name, "conn");
        assert!(!idx.is_verified("ns", "out", "u1", "h1"));
        idx.mark_verified("ns", "out", Some("5".into()));
        assert!(idx.is_verified("ns", "out", "u1", "h1"));
        assert!(
            idx.apply_event(Event::Apply(meta("ns", "out", "5", Some("conn"))))
                .is_empty(),
            "the echo of our own write wakes nobody"
        );
        assert!(!idx.is_verified("ns", "out", "u1", "h2"));
        idx.apply_event(Event::Apply(meta("ns", "out", "6", Some("conn"))));
        assert!(
            !idx.is_verified("ns", "out", "u1", "h1"),
            "someone else wrote it"
        );
        let refs = idx.apply_event(Event::Delete(meta("ns", "out", "6", Some("conn"))));
        assert_eq!(refs[0].name, "conn");
        assert!(idx.managed("ns", "out").is_none());
    }

    #[test]
    fn synced_only_after_the_first_list() {
        let idx = SecretIndex::default();
        assert!(!idx.is_synced());
        idx.apply_event(Event::Init);
        idx.apply_event(Event::InitApply(meta("ns", "out", "1", Some("conn"))));
        assert!(!idx.is_synced(), "still listing");
        idx.apply_event(Event::InitDone);
        assert!(idx.is_synced());
    }

    #[test]
    fn relist_detects_managed_secrets_deleted_while_disconnected() {
        let idx = SecretIndex::default();
        idx.apply_event(Event::Apply(meta("ns", "out", "5", Some("conn"))));
        idx.apply_event(Event::Init);
        assert!(idx
            .apply_event(Event::InitApply(meta("ns", "x", "1", None)))
            .is_empty());
        let refs = idx.apply_event(Event::InitDone);
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].name, "conn");
        assert!(idx.managed("ns", "out").is_none());
    }
}
