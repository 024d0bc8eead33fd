//! Synchronisation primitives, swapped for loom's under `--cfg loom` so the
//! protocol can be model-checked.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub use loom::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// An immutable value published for lock-free readers: `arc-swap` in the
/// product, a mutex-held `Arc` under loom (which cannot model arc-swap).
pub struct Published<T> {
    #[cfg(not(loom))]
    inner: arc_swap::ArcSwap<T>,
    #[cfg(loom)]
    inner: Mutex<Arc<T>>,
}

impl<T> Published<T> {
    pub fn new(v: Arc<T>) -> Self {
        #[cfg(not(loom))]
        return Self {
            inner: arc_swap::ArcSwap::new(v),
        };
        #[cfg(loom)]
        return Self {
            inner: Mutex::new(v),
        };
    }

    /// A snapshot; never blocks (in the product).
    pub fn load(&self) -> Arc<T> {
        #[cfg(not(loom))]
        return self.inner.load_full();
        #[cfg(loom)]
        return self.inner.lock().unwrap().clone();
    }

    pub fn store(&self, v: Arc<T>) {
        #[cfg(not(loom))]
        self.inner.store(v);
        #[cfg(loom)]
        {
            *self.inner.lock().unwrap() = v;
        }
    }
}

/// Let another thread run (a loom scheduling point under loom).
pub fn yield_now() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::thread::yield_now();
}
