//! The application service: commands through the ledger, then read-your-writes through the
//! projector; and the scheduled purge of organizations past their restore window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use orgledger_domain::{Actor, Command, OrganizationCommand, PurgeOrganization};
use orgledger_projections::{organizations, Projector};
use uuid::Uuid;

use crate::ledger::{Committed, Ledger, LedgerError, RequestContext};
use crate::store::{MasterKey, StoreFeed};
use orgledger_projections::Database;

/// How long a command waits for the read models by default.
pub const DEFAULT_CONSISTENCY_WAIT: Duration = Duration::from_secs(5);

/// The runner's connections: its batch transaction, the feed read inside it, the held-back
/// probe, the leader's advisory lock and the notification listener; in a process that does
/// not lead, the NOTIFY sent after its commits.
const RUNNER_CONNECTIONS: u32 = 5;

/// A committed command and whether the read models already show it.
#[derive(Debug)]
pub struct Outcome {
    pub committed: Committed,
    /// False when the projections were still behind after the bounded wait.
    pub consistent: bool,
}

pub struct Orgledger {
    pub ledger: Ledger,
    pub projector: Arc<Projector>,
    pub consistency_wait: Duration,
    timings: CommandTimings,
}

/// Where commands spent their time, summed since the service opened.
#[derive(Debug, Default)]
struct CommandTimings {
    commands: AtomicU64,
    committing_us: AtomicU64,
    waiting_us: AtomicU64,
}

/// [`CommandTimings`] read at one moment: subtract two to time a stretch of work.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommandTimes {
    /// Commands that were decided and, if they changed anything, committed.
    pub commands: u64,
    /// In the ledger: loading, deciding, storing, retrying conflicts.
    pub committing: Duration,
    /// Waiting for the read models to show the commit (read-your-writes).
    pub waiting: Duration,
}

impl std::ops::Sub for CommandTimes {
    type Output = Self;

    fn sub(self, earlier: Self) -> Self {
        Self {
            commands: self.commands.saturating_sub(earlier.commands),
            committing: self.committing.saturating_sub(earlier.committing),
            waiting: self.waiting.saturating_sub(earlier.waiting),
        }
    }
}

impl Orgledger {
    /// Wires the ledger and projector over one database; creates missing read-model tables.
    pub async fn open(database: Database, master_key: MasterKey) -> Result<Self, LedgerError> {
        let ledger = Ledger::new(database.clone(), master_key);
        // Commands wait for the runner; with a pool of its own it never queues behind them.
        let runner_database = database.separate_pool(RUNNER_CONNECTIONS);
        let feed = Arc::new(StoreFeed::new(
            runner_database.clone(),
            ledger.keys().clone(),
        ));
        let projector = Arc::new(Projector::new(runner_database, feed).with_request_pool(database));
        projector
            .prepare()
            .await
            .map_err(|error| LedgerError::Store(error.to_string()))?;
        Ok(Self {
            ledger,
            projector,
            consistency_wait: DEFAULT_CONSISTENCY_WAIT,
            timings: CommandTimings::default(),
        })
    }

    /// Closes the connections of the ledger and of the projection runner.
    pub async fn close(&self) {
        self.ledger.database().close().await;
        self.projector.database().close().await;
    }

    pub fn database(&self) -> &Database {
        self.ledger.database()
    }

    /// Where commands have spent their time so far.
    pub fn command_times(&self) -> CommandTimes {
        let micros = |sum: &AtomicU64| Duration::from_micros(sum.load(Ordering::Relaxed));
        CommandTimes {
            commands: self.timings.commands.load(Ordering::Relaxed),
            committing: micros(&self.timings.committing_us),
            waiting: micros(&self.timings.waiting_us),
        }
    }

    /// Creates an organization and waits for its read models.
    pub async fn create_organization(
        &self,
        command: Command,
        slug_was_given: bool,
        context: &RequestContext,
    ) -> Result<Outcome, LedgerError> {
        let started = Instant::now();
        let committed = self
            .ledger
            .create_organization(command, slug_was_given, context)
            .await?;
        self.settle(committed, started).await
    }

    /// The user's personal organization, created once; `true` when this call created it.
    pub async fn personal_organization(
        &self,
        command: Command,
        context: &RequestContext,
    ) -> Result<(Outcome, bool), LedgerError> {
        let started = Instant::now();
        let (committed, created) = self.ledger.personal_organization(command, context).await?;
        Ok((self.settle(committed, started).await?, created))
    }

    /// Runs a command and waits for its read models.
    pub async fn run(
        &self,
        organization_id: Uuid,
        command: Command,
        context: &RequestContext,
        expected_version: Option<usize>,
    ) -> Result<Outcome, LedgerError> {
        let started = Instant::now();
        let committed = self
            .ledger
            .run(organization_id, command, context, expected_version)
            .await?;
        self.settle(committed, started).await
    }

    /// Waits for the read models to show `committed`, a command the ledger began at
    /// `started`; both stretches are timed.
    async fn settle(&self, committed: Committed, started: Instant) -> Result<Outcome, LedgerError> {
        let committing = started.elapsed();
        self.timings.commands.fetch_add(1, Ordering::Relaxed);
        self.timings
            .committing_us
            .fetch_add(committing.as_micros() as u64, Ordering::Relaxed);
        metrics::histogram!("orgledger_command_commit_seconds").record(committing.as_secs_f64());
        if committed.events.is_empty() {
            return Ok(Outcome {
                committed,
                consistent: true,
            });
        }
        self.projector.committed();
        let waiting_since = Instant::now();
        let consistent = self
            .projector
            .wait_for(
                &committed.organization_id.to_string(),
                committed.version as i64,
                self.consistency_wait,
            )
            .await
            .map_err(|error| LedgerError::Store(error.to_string()))?;
        let waited = waiting_since.elapsed();
        self.timings
            .waiting_us
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        metrics::histogram!("orgledger_read_model_wait_seconds").record(waited.as_secs_f64());
        if !consistent {
            tracing::warn!(organization_id = %committed.organization_id, version = committed.version, "read models still behind after the consistency wait");
        }
        Ok(Outcome {
            committed,
            consistent,
        })
    }

    /// Purges, as `system`, every soft-deleted organization whose restore window has
    /// elapsed. Returns how many were purged.
    pub async fn purge_expired(&self) -> Result<usize, LedgerError> {
        let now = Utc::now();
        let due = organizations::due_for_purge(self.database(), now, 100)
            .await
            .map_err(|error| LedgerError::Store(error.to_string()))?;
        let mut purged = 0;
        for (id, name) in due {
            let Ok(organization_id) = Uuid::parse_str(&id) else {
                continue;
            };
            let command = Command::new(
                Actor::System,
                now,
                OrganizationCommand::PurgeOrganization(PurgeOrganization { confirm_name: name }),
            );
            match self
                .run(organization_id, command, &RequestContext::default(), None)
                .await
            {
                Ok(_) => {
                    purged += 1;
                    tracing::info!(%organization_id, "purged after its restore window");
                }
                // Restored or purged meanwhile by someone else: nothing to do.
                Err(LedgerError::Rejected(rejection)) => {
                    tracing::info!(%organization_id, %rejection, "scheduled purge skipped");
                }
                Err(error) => return Err(error),
            }
        }
        Ok(purged)
    }
}
