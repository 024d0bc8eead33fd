//! The CMOS real-time clock (MC146818) at ports 0x70 (index) and 0x71
//! (data): the host's UTC time in BCD, 24-hour mode, never "update in
//! progress", and 114 bytes of battery-backed RAM. Linux reads its wall
//! clock here at boot (`mach_get_cmos_time`) when it probes the RTC; a
//! guest may write the RAM and the alarm registers, but not set the time
//! (the host's clock is the guest's, as in Cloud Hypervisor and QEMU's
//! default `-rtc base=utc`). Reads happen on the vCPU thread, under its
//! seccomp filter: only `clock_gettime`.

use super::BusDevice;

pub const CMOS_BASE: u64 = 0x70;
pub const CMOS_LEN: u64 = 2;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

/// Status A: the 32.768 kHz time base and a 1024 Hz rate (the reset
/// values); bit 7 (update in progress) is never set.
const STATUS_A_VALUE: u8 = 0x26;
/// Status B: 24-hour mode, BCD values, no interrupts.
const STATUS_B_VALUE: u8 = 0x02;
/// Status D: the battery is good (valid RAM and time).
const STATUS_D_VALUE: u8 = 0x80;

/// A calendar time, as the RTC shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    pub year: u32,
    /// 1–12.
    pub month: u8,
    /// 1–31.
    pub day: u8,
    /// 1 (Sunday) – 7.
    pub weekday: u8,
    pub hours: u8,
    pub minutes: u8,
    pub seconds: u8,
}

impl Clock {
    /// The host's time now, in UTC.
    pub fn now() -> Self {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self::from_unix(secs)
    }

    /// The UTC calendar time of `secs` since 1970 (computed here: glibc's
    /// `gmtime_r` reads /etc/localtime on its first call, which the vCPU's
    /// seccomp filter forbids; the days-to-date step is Howard Hinnant's
    /// `civil_from_days`).
    pub fn from_unix(secs: u64) -> Self {
        let days = secs / 86_400;
        let rem = secs % 86_400;
        // 1970-01-01 was a Thursday (weekday 5, Sunday = 1).
        let weekday = ((days + 4) % 7 + 1) as u8;
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = (yoe + era * 400 + u64::from(month <= 2)) as u32;
        Clock {
            year,
            month,
            day,
            weekday,
            hours: (rem / 3600) as u8,
            minutes: (rem / 60 % 60) as u8,
            seconds: (rem % 60) as u8,
        }
    }
}

fn bcd(v: u32) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    clock: fn() -> Clock,
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl Cmos {
    pub fn new() -> Self {
        Self::with_clock(Clock::now)
    }

    /// A CMOS reading its time from `clock` (tests).
    pub fn with_clock(clock: fn() -> Clock) -> Self {
        Cmos {
            index: 0,
            ram: [0; 128],
            clock,
        }
    }

    fn register(&mut self, index: u8) -> u8 {
        let time = || (self.clock)();
        match index {
            SECONDS => bcd(time().seconds.into()),
            MINUTES => bcd(time().minutes.into()),
            HOURS => bcd(time().hours.into()),
            WEEKDAY => bcd(time().weekday.into()),
            DAY => bcd(time().day.into()),
            MONTH => bcd(time().month.into()),
            YEAR => bcd(time().year % 100),
            CENTURY => bcd(time().year / 100),
            STATUS_A => STATUS_A_VALUE,
            STATUS_B => STATUS_B_VALUE,
            // No interrupt ever pending.
            STATUS_C => 0,
            STATUS_D => STATUS_D_VALUE,
            i => self.ram[usize::from(i)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 => self.index,
            _ => self.register(self.index),
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else {
            return;
        };
        match offset {
            // Bit 7 of the index port masks NMIs on real hardware.
            0 => self.index = v & 0x7f,
            _ => match self.index {
                // The time is the host's; writes to it (and to the
                // read-only status registers) are dropped.
                SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => {}
                STATUS_A | STATUS_B | STATUS_C | STATUS_D => {}
                i => self.ram[usize::from(i)] = v,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed() -> Clock {
        Clock {
            year: 2026,
            month: 12,
            day: 4,
            weekday: 6,
            hours: 23,
            minutes: 59,
            seconds: 7,
        }
    }

    fn read(c: &mut Cmos, index: u8) -> u8 {
        c.write(0, &[index | 0x80]);
        let mut b = [0xaa];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn time_registers_are_bcd_of_the_clock() {
        let mut c = Cmos::with_clock(fixed);
        let got: Vec<u8> = [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY]
            .iter()
            .map(|&i| read(&mut c, i))
            .collect();
        assert_eq!(got, vec![0x07, 0x59, 0x23, 0x06, 0x04, 0x12, 0x26, 0x20]);
        assert_eq!(read(&mut c, STATUS_A) & 0x80, 0, "never updating");
        assert_eq!(read(&mut c, STATUS_B), 0x02, "24 h, BCD");
        assert_eq!(read(&mut c, STATUS_D), 0x80, "valid");
    }

    #[test]
    fn ram_keeps_writes_and_the_time_ignores_them() {
        let mut c = Cmos::with_clock(fixed);
        c.write(0, &[0x40]);
        c.write(1, &[0x5a]);
        assert_eq!(read(&mut c, 0x40), 0x5a);
        c.write(0, &[SECONDS]);
        c.write(1, &[0x00]);
        assert_eq!(read(&mut c, SECONDS), 0x07);
        let mut idx = [0];
        c.write(0, &[0x8e]);
        c.read(0, &mut idx);
        assert_eq!(idx[0], 0x0e, "the NMI bit is not part of the index");
    }

    #[test]
    fn unix_times_become_their_utc_dates() {
        let c = |y, mo, d, wd, h, mi, s| Clock {
            year: y,
            month: mo,
            day: d,
            weekday: wd,
            hours: h,
            minutes: mi,
            seconds: s,
        };
        assert_eq!(Clock::from_unix(0), c(1970, 1, 1, 5, 0, 0, 0));
        // 2000-02-29 (a leap day of a century year) 12:34:56, a Tuesday.
        assert_eq!(Clock::from_unix(951_827_696), c(2000, 2, 29, 3, 12, 34, 56));
        // 2026-12-04 23:59:59, a Friday.
        assert_eq!(
            Clock::from_unix(1_796_428_799),
            c(2026, 12, 4, 6, 23, 59, 59)
        );
        // 2100-03-01 00:00:00 (2100 is no leap year), a Monday.
        assert_eq!(Clock::from_unix(4_107_542_400), c(2100, 3, 1, 2, 0, 0, 0));
    }

    #[test]
    fn now_is_a_plausible_utc_date() {
        let n = Clock::now();
        assert!(n.year >= 2024 && (1..=12).contains(&n.month) && (1..=31).contains(&n.day));
        assert!((1..=7).contains(&n.weekday) && n.hours < 24 && n.minutes < 60);
    }
}
