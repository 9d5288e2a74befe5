use chrono::{DateTime, TimeZone, Utc};

/// Read models store instants as microseconds since the epoch: sortable and identical on
/// both backends.
pub fn to_micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

pub fn from_micros(micros: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(micros)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}
