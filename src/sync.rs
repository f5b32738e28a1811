//! A poison-tolerant lock: every Mutex here guards plain maps that stay consistent even if a
//! holder panicked, so a poisoned lock is used as it is rather than panicking every reconcile.
use std::sync::{Mutex, MutexGuard};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
