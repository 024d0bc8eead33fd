//! Where a page's first content comes from.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("cannot open memory image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "memory image {path} is {len} bytes, smaller than the {need} bytes of guest RAM it backs"
    )]
    TooSmall { path: PathBuf, len: u64, need: u64 },
    #[error("reading memory image {path} at offset {offset:#x} failed: {reason}")]
    Read {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

/// The content of pages at first touch.
#[derive(Clone)]
pub enum PageSource {
    /// Zero-filled.
    Zero,
    /// Read from a file; the slot's byte `o` is the file's byte `offset + o`.
    File(Arc<ImageFile>),
}

/// Pages of an image file that are still on their way (a post-copy
/// migration's destination receives them while the guest runs): a read
/// of them waits until they are there.
pub trait Arrival: Send + Sync {
    /// Return once `[offset, offset + len)` of the file holds its final
    /// content (asking for what is missing, if it can), or say why it
    /// never will.
    fn wait(&self, offset: u64, len: u64) -> Result<(), String>;

    /// Return once the page at `offset` is there (asking for it and a few
    /// after it, if it can): how many bytes of `[offset, offset + len)`
    /// are there from `offset` on (at least the page).
    fn ready(&self, offset: u64, len: u64) -> Result<u64, String>;

    /// How many bytes from `offset` (at most `len`) are there now.
    fn ready_now(&self, offset: u64, len: u64) -> u64;
}

pub struct ImageFile {
    pub path: PathBuf,
    pub file: File,
    /// Its length when opened.
    pub len: u64,
    /// A diff snapshot's memory: the image below it, and the ranges of
    /// this file read from it instead.
    below: Option<(Arc<ImageFile>, Vec<Redirect>)>,
    /// Pages not in the file yet.
    arriving: Option<Arc<dyn Arrival>>,
}

/// `[offset, offset+len)` of a layered image is the image below's
/// `[at, at+len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    pub offset: u64,
    pub len: u64,
    pub at: u64,
}

impl ImageFile {
    /// Open a diff snapshot's memory file (`need` bytes at least) over the
    /// image of its base: `redirects` (sorted, disjoint) are read from
    /// `below`, the rest from the file.
    pub fn open_over(
        path: &Path,
        need: u64,
        below: Arc<ImageFile>,
        redirects: Vec<Redirect>,
    ) -> Result<Arc<ImageFile>, SourceError> {
        let mut image = Self::open_file(path, need)?;
        image.below = Some((below, redirects));
        Ok(Arc::new(image))
    }

    /// Open an image whose pages `arrival` says are still coming: a read
    /// of them waits for them.
    pub fn open_arriving(
        path: &Path,
        need: u64,
        arrival: Arc<dyn Arrival>,
    ) -> Result<Arc<ImageFile>, SourceError> {
        let mut image = Self::open_file(path, need)?;
        image.arriving = Some(arrival);
        Ok(Arc::new(image))
    }

    /// Whether some of its pages are another file's (a diff snapshot's).
    pub fn is_layered(&self) -> bool {
        self.below.is_some()
    }

    /// Open an image that must cover `need` bytes.
    pub fn open(path: &Path, need: u64) -> Result<Arc<ImageFile>, SourceError> {
        Self::open_file(path, need).map(Arc::new)
    }

    fn open_file(path: &Path, need: u64) -> Result<ImageFile, SourceError> {
        let file = File::open(path).map_err(|source| SourceError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| SourceError::Open {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if len < need {
            return Err(SourceError::TooSmall {
                path: path.to_path_buf(),
                len,
                need,
            });
        }
        Ok(ImageFile {
            path: path.to_path_buf(),
            file,
            len,
            below: None,
            arriving: None,
        })
    }

    /// Ask the host to read `[offset, offset + len)` into its page cache
    /// (asynchronously; advice only), each part in the layer that has it.
    /// One disk request for a block around a random first touch, where a
    /// 4 KiB read would be one per page: the read-around the kernel does
    /// for a file mapping's faults.
    pub fn read_around(&self, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        self.each_part(offset, len, &mut |layer, at, n| {
            // SAFETY: advice on a descriptor we own; no memory is passed.
            unsafe {
                libc::posix_fadvise(
                    layer.file.as_raw_fd(),
                    at as libc::off_t,
                    n as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                )
            };
            Ok(())
        })
        .unwrap_or(());
    }

    /// How many bytes from `offset` (at most `len`) can be read without
    /// waiting, once the first page can (a post-copy destination's image
    /// waits for it): a fault reads that much rather than wait for its
    /// whole window.
    pub fn ready(&self, offset: u64, len: u64) -> Result<u64, SourceError> {
        let mut done = 0u64;
        let mut short = false;
        self.each_part(offset, len, &mut |layer, at, n| {
            if short {
                return Ok(());
            }
            let got = match &layer.arriving {
                None => n,
                // Wait only for the very first page.
                Some(a) if done == 0 => a.ready(at, n).map_err(|reason| SourceError::Read {
                    path: layer.path.clone(),
                    offset: at,
                    reason,
                })?,
                Some(a) => a.ready_now(at, n),
            };
            done += got.min(n);
            short = got < n;
            Ok(())
        })?;
        Ok(done)
    }

    /// Fill `buf` from `offset`, each part from the layer that has it; a
    /// short read (the file shrank) is an error.
    pub fn read_page(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let mut done = 0usize;
        self.each_part(offset, buf.len() as u64, &mut |layer, at, n| {
            let r = layer.read_own(at, &mut buf[done..done + n as usize]);
            done += n as usize;
            r
        })
    }

    /// `[offset, offset + len)` split where the layers split: `f(layer,
    /// offset in the layer's own file, bytes)` for each part, in order.
    fn each_part(
        &self,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(&ImageFile, u64, u64) -> Result<(), SourceError>,
    ) -> Result<(), SourceError> {
        let Some((below, redirects)) = &self.below else {
            return f(self, offset, len);
        };
        let mut done = 0;
        while done < len {
            let at = offset + done;
            let left = len - done;
            let i = redirects.partition_point(|r| r.offset + r.len <= at);
            let n = match redirects.get(i) {
                Some(r) if r.offset <= at => {
                    let n = left.min(r.offset + r.len - at);
                    below.each_part(r.at + (at - r.offset), n, f)?;
                    n
                }
                next => {
                    let n = left.min(next.map_or(u64::MAX, |r| r.offset) - at);
                    f(self, at, n)?;
                    n
                }
            };
            done += n;
        }
        Ok(())
    }

    fn read_own(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        if let Some(a) = &self.arriving {
            a.wait(offset, buf.len() as u64)
                .map_err(|reason| SourceError::Read {
                    path: self.path.clone(),
                    offset,
                    reason,
                })?;
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| SourceError::Read {
                path: self.path.clone(),
                offset,
                reason: if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    "the file ends before this page (was it truncated?)".to_string()
                } else {
                    e.to_string()
                },
            })
    }
}
