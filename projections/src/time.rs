use chrono::{DateTime, TimeZone, Utc};

/// Read models store instants as microseconds since the epoch: sortable and identical on
/// both backends.
pub fn to_micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

/// The first whole microsecond at or after `at`. Read models hold whole microseconds, so for
/// a stored `x`, `x >= at` and `x < at` hold exactly when they hold against this bound: a
/// bound finer than a microsecond compares as the next one, not the one it is cut to.
pub fn ceil_micros(at: DateTime<Utc>) -> i64 {
    let micros = at.timestamp_micros();
    if at.timestamp_subsec_nanos().is_multiple_of(1_000) {
        micros
    } else {
        micros + 1
    }
}

pub fn from_micros(micros: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(micros)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_finer_than_a_microsecond_compares_as_the_next_microsecond() {
        let whole = DateTime::parse_from_rfc3339("2026-12-06T16:36:58.610221Z")
            .unwrap()
            .with_timezone(&Utc);
        let finer = DateTime::parse_from_rfc3339("2026-12-06T16:36:58.610221001Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(ceil_micros(whole), to_micros(whole));
        assert_eq!(ceil_micros(finer), to_micros(whole) + 1);
        let before_the_epoch = DateTime::parse_from_rfc3339("1969-12-31T23:59:59.999999500Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(ceil_micros(before_the_epoch), 0);
    }
}
