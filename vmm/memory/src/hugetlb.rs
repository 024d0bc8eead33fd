//! 2 MiB hugetlb pages for guest RAM (`--mem-hugepages`): the host's pool
//! is checked, and raised when it is short, before anything is mapped, so
//! that a host without huge pages is a clear error at start rather than a
//! SIGBUS in the middle of a run.

use super::MemError;

/// The huge page size used (x86_64's 2 MiB).
pub const HUGE_PAGE: u64 = 2 << 20;

const MEMINFO: &str = "/proc/meminfo";
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// `(total, free, reserved)` 2 MiB pages of the host's pool.
fn pool() -> Result<(u64, u64, u64), MemError> {
    let text = std::fs::read_to_string(MEMINFO)
        .map_err(|e| MemError::HugePages(format!("{MEMINFO}: {e}")))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    if field("Hugepagesize:") != Some(HUGE_PAGE >> 10) {
        return Err(MemError::HugePages(format!(
            "the host's default huge page size is not 2 MiB ({MEMINFO})"
        )));
    }
    match (
        field("HugePages_Total:"),
        field("HugePages_Free:"),
        field("HugePages_Rsvd:"),
    ) {
        (Some(t), Some(f), Some(r)) => Ok((t, f, r)),
        _ => Err(MemError::HugePages(format!(
            "{MEMINFO} has no HugePages_* lines"
        ))),
    }
}

/// Make sure `pages` 2 MiB pages are free and unreserved: raise the pool
/// (`vm.nr_hugepages`) by what is missing if it is short. The pool is left
/// as raised.
pub fn reserve(pages: u64) -> Result<(), MemError> {
    let (total, free, rsvd) = pool()?;
    let available = free.saturating_sub(rsvd);
    if available >= pages {
        return Ok(());
    }
    let want = total + (pages - available);
    let raised = std::fs::write(NR_HUGEPAGES, want.to_string());
    let (_, free, rsvd) = pool()?;
    let now = free.saturating_sub(rsvd);
    if now >= pages {
        log::info!("hugetlb pool raised to {want} pages of 2 MiB ({NR_HUGEPAGES})");
        return Ok(());
    }
    Err(MemError::HugePages(format!(
        "--mem-hugepages needs {pages} free 2 MiB huge pages; the host has {now}{}",
        match raised {
            Err(e) => format!(" and {NR_HUGEPAGES} could not be raised ({e})"),
            Ok(()) =>
                format!(" after raising {NR_HUGEPAGES} to {want} (not enough contiguous memory?)"),
        }
    )))
}
