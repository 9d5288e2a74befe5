//! Streamed exports. Rows are read page by page (keyset pagination) and written out as they
//! come, so memory stays flat however long the log is.

use chrono::Utc;
use futures::Stream;
use tokio::sync::mpsc;

use crate::audit::{self, AuditEntryView, AuditFilter};
use crate::db::Database;

const PAGE: usize = 1_000;

/// The CSV columns, in the contract's order.
pub const AUDIT_CSV_HEADER: [&str; 8] = [
    "sequence",
    "occurred_at",
    "actor_type",
    "actor_id",
    "action",
    "resource_type",
    "resource_id",
    "details",
];

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("csv error: {0}")]
    Csv(#[from] csv::Error),
    /// The task writing the export ended without finishing it (it panicked): what was sent
    /// is not the whole export.
    #[error("the export stopped before its end: {0}")]
    Aborted(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditFormat {
    Csv,
    Json,
}

/// Chunks of bytes, produced by a task that stops when the receiver goes away.
pub type ByteStream = std::pin::Pin<Box<dyn Stream<Item = Result<Vec<u8>, ExportError>> + Send>>;

/// Turns a producer writing into a bounded channel into a stream (backpressure included).
pub fn channel_stream<F, Fut>(produce: F) -> ByteStream
where
    F: FnOnce(mpsc::Sender<Result<Vec<u8>, ExportError>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = mpsc::channel(4);
    let producer = tokio::spawn(produce(sender));
    // The channel closes both when the producer is done and when it panicked: only its
    // outcome tells a whole export from a cut one.
    Box::pin(futures::stream::unfold(
        (receiver, Some(producer)),
        |(mut receiver, producer)| async move {
            if let Some(chunk) = receiver.recv().await {
                return Some((chunk, (receiver, producer)));
            }
            match producer?.await {
                Ok(()) => None,
                Err(error) => Some((
                    Err(ExportError::Aborted(error.to_string())),
                    (receiver, None),
                )),
            }
        },
    ))
}

/// The audit log between `from` (inclusive) and `to` (exclusive), as RFC 4180 CSV or a JSON
/// array of entries.
pub fn audit_log(
    database: Database,
    organization_id: String,
    filter: AuditFilter,
    format: AuditFormat,
) -> ByteStream {
    channel_stream(move |sender| async move {
        let result = write_audit(&database, &organization_id, &filter, format, &sender).await;
        if let Err(error) = result {
            tracing::error!(%error, "audit export failed mid-stream");
            let _ = sender.send(Err(error)).await;
        }
    })
}

async fn write_audit(
    database: &Database,
    organization_id: &str,
    filter: &AuditFilter,
    format: AuditFormat,
    sender: &mpsc::Sender<Result<Vec<u8>, ExportError>>,
) -> Result<(), ExportError> {
    let mut first = true;
    let opening = match format {
        AuditFormat::Csv => csv_record(&AUDIT_CSV_HEADER)?,
        AuditFormat::Json => b"[".to_vec(),
    };
    if sender.send(Ok(opening)).await.is_err() {
        return Ok(());
    }
    let mut after = 0;
    loop {
        let entries = audit::page(database, organization_id, filter, after, PAGE).await?;
        let Some(last) = entries.last() else { break };
        after = last.sequence;
        let mut chunk = Vec::with_capacity(entries.len() * 256);
        for entry in &entries {
            match format {
                AuditFormat::Csv => chunk.extend(csv_record(&csv_fields(entry))?),
                AuditFormat::Json => {
                    if !first {
                        chunk.push(b',');
                    }
                    serde_json::to_writer(&mut chunk, entry).expect("entries serialize");
                }
            }
            first = false;
        }
        if sender.send(Ok(chunk)).await.is_err() {
            return Ok(());
        }
        if entries.len() < PAGE {
            break;
        }
    }
    if format == AuditFormat::Json {
        let _ = sender.send(Ok(b"]".to_vec())).await;
    }
    Ok(())
}

fn csv_fields(entry: &AuditEntryView) -> [String; 8] {
    [
        entry.sequence.to_string(),
        entry
            .occurred_at
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        entry.actor.kind.clone(),
        inert_in_a_spreadsheet(&entry.actor.id),
        entry.action.clone(),
        entry.resource.kind.clone(),
        inert_in_a_spreadsheet(&entry.resource.id),
        entry.details.to_string(),
    ]
}

/// A cell a spreadsheet would run as a formula (it starts with `=`, `+`, `-`, `@`, a tab or
/// a carriage return) gets a leading `'`, which spreadsheets read as "text": user ids are
/// the caller's choice, and whoever opens a compliance export must not run one. The JSON
/// export keeps every value exact.
fn inert_in_a_spreadsheet(text: &str) -> String {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_owned()
    }
}

/// One RFC 4180 record (quoted as needed, CRLF-terminated).
fn csv_record<S: AsRef<[u8]>>(fields: &[S]) -> Result<Vec<u8>, ExportError> {
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    writer.write_record(fields)?;
    writer.flush().map_err(csv::Error::from)?;
    Ok(writer
        .into_inner()
        .map_err(|error| error.into_error())
        .map_err(csv::Error::from)?)
}

/// A file name for an export: `audit-log-<org>-<date>.csv`.
pub fn attachment_name(kind: &str, organization_id: &str, extension: &str) -> String {
    format!(
        "{kind}-{organization_id}-{}.{extension}",
        Utc::now().format("%Y%m%dT%H%M%SZ")
    )
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[test]
    fn a_cell_a_spreadsheet_would_run_as_a_formula_is_written_as_text() {
        for formula in ["=1+2", "+x", "-y", "@SUM(A1)", "\t=1", "\r=1"] {
            assert_eq!(inert_in_a_spreadsheet(formula), format!("'{formula}"));
        }
        for plain in ["olivia", "0190f5a0-0000-7000-8000-000000000001", "a=b", ""] {
            assert_eq!(inert_in_a_spreadsheet(plain), plain);
        }
        let record = csv_record(&["1", &inert_in_a_spreadsheet("=HYPERLINK(\"x\")")]).unwrap();
        assert_eq!(record, b"1,\"'=HYPERLINK(\"\"x\"\")\"\r\n");
    }

    #[tokio::test]
    async fn a_producer_that_panics_ends_the_stream_with_an_error_not_a_clean_end() {
        let mut stream = channel_stream(|sender| async move {
            let _ = sender.send(Ok(b"{\"first\":".to_vec())).await;
            panic!("a row that does not convert");
        });
        assert_eq!(stream.next().await.unwrap().unwrap(), b"{\"first\":");
        let cut = stream.next().await.expect("an item after the cut");
        assert!(matches!(cut, Err(ExportError::Aborted(_))), "{cut:?}");
        assert!(stream.next().await.is_none());

        let mut whole = channel_stream(|sender| async move {
            let _ = sender.send(Ok(b"{}".to_vec())).await;
        });
        assert_eq!(whole.next().await.unwrap().unwrap(), b"{}");
        assert!(
            whole.next().await.is_none(),
            "a finished producer ends cleanly"
        );
    }
}
