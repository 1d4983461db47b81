//! Durations (`timeout: 1h 30m`, `expire_in: 7 days`) and memory sizes (`RAVE_MEMORY: 1.5G`).

use std::time::Duration;

/// Parse a GitLab-style human duration: "1h 30m", "90 minutes", "7 days", "1 year", "3600".
/// A bare number is seconds, as GitLab reads it.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    let mut any = false;
    while !rest.trim_start().is_empty() {
        rest = rest.trim_start().trim_start_matches(',').trim_start();
        if let Some(r) = rest.strip_prefix("and ") {
            rest = r.trim_start();
        }
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!("expected a number in `{s}`"));
        }
        let n: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("bad number in `{s}`"))?;
        rest = rest[num_len..].trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = rest[..unit_len].to_ascii_lowercase();
        rest = &rest[unit_len..];
        let mult = match unit.as_str() {
            "s" | "sec" | "secs" | "second" | "seconds" | "" => 1.0,
            "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3600.0,
            "d" | "day" | "days" => 86400.0,
            "w" | "wk" | "week" | "weeks" => 7.0 * 86400.0,
            "mo" | "month" | "months" => 30.0 * 86400.0,
            "y" | "yr" | "year" | "years" => 365.0 * 86400.0,
            other => return Err(format!("unknown time unit `{other}` in `{s}`")),
        };
        total += n * mult;
        any = true;
    }
    if !any {
        return Err(format!("no duration in `{s}`"));
    }
    if !(0.0..=1e12).contains(&total) {
        return Err(format!("duration `{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Parse a memory size: "512", "512M", "512MiB", "1.5G", "3GiB", "2048Mi". A bare number is MiB.
/// Decimal and binary suffixes both mean binary units, as memory limits almost always are.
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let num_len = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    if num_len == 0 {
        return Err(format!("`{s}` is not a memory size (e.g. 512M, 1.5G)"));
    }
    let n: f64 = t[..num_len]
        .parse()
        .map_err(|_| format!("`{s}` is not a memory size (e.g. 512M, 1.5G)"))?;
    let unit = t[num_len..].trim().to_ascii_lowercase();
    let mult: f64 = match unit.as_str() {
        "" | "m" | "mb" | "mi" | "mib" => 1024.0 * 1024.0,
        "b" => 1.0,
        "k" | "kb" | "ki" | "kib" => 1024.0,
        "g" | "gb" | "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown memory unit `{other}` in `{s}` (use K, M, G)"
            ));
        }
    };
    let bytes = n * mult;
    if !(1.0..=1e18).contains(&bytes) {
        return Err(format!("memory size `{s}` is out of range"));
    }
    Ok(bytes as u64)
}

/// Parse a CPU count: "2", "0.5", "1500m" (millicores, as Kubernetes writes them).
pub fn parse_cpus(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let v = if let Some(m) = t.strip_suffix('m') {
        m.parse::<f64>().map(|v| v / 1000.0)
    } else {
        t.parse::<f64>()
    }
    .map_err(|_| format!("`{s}` is not a CPU count (e.g. 2, 0.5, 1500m)"))?;
    if !(v > 0.0 && v <= 4096.0) {
        return Err(format!("CPU count `{s}` is out of range"));
    }
    Ok(v)
}

/// Human form of a byte count, in MiB or GiB.
pub fn format_memory(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if bytes >= 1024 * MIB && bytes.is_multiple_of(1024 * MIB) {
        format!("{} GiB", bytes / (1024 * MIB))
    } else if bytes >= MIB {
        let mib = bytes as f64 / MIB as f64;
        if (mib - mib.round()).abs() < 0.05 {
            format!("{} MiB", mib.round() as u64)
        } else {
            format!("{mib:.1} MiB")
        }
    } else {
        format!("{} KiB", bytes.div_ceil(1024))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h 30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("7 days").unwrap().as_secs(), 7 * 86400);
        assert_eq!(parse_duration("1 year").unwrap().as_secs(), 365 * 86400);
        assert_eq!(parse_duration("3600").unwrap().as_secs(), 3600);
        assert_eq!(parse_duration("2 hrs and 10 mins").unwrap().as_secs(), 7800);
        assert!(parse_duration("1 fortnight").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn memory() {
        assert_eq!(parse_memory("512").unwrap(), 512 << 20);
        assert_eq!(parse_memory("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_memory("1.5G").unwrap(), 1536 << 20);
        assert_eq!(parse_memory("3GiB").unwrap(), 3 << 30);
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("3 parsecs").is_err());
        assert_eq!(format_memory(512 << 20), "512 MiB");
        assert_eq!(format_memory(3 << 30), "3 GiB");
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("2").unwrap(), 2.0);
        assert_eq!(parse_cpus("500m").unwrap(), 0.5);
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("x").is_err());
    }
}
