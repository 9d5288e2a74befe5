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
/// The longest it may be set to: a caller waits no longer than a minute for an answer.
pub const MAX_CONSISTENCY_WAIT: Duration = Duration::from_secs(60);

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
    /// In microseconds: see [`Orgledger::set_consistency_wait`].
    consistency_wait_us: AtomicU64,
    time_spent: TimeSpent,
}

/// Where commands spent their time, summed since the service opened.
#[derive(Debug, Default)]
struct TimeSpent {
    commands: AtomicU64,
    committing_us: AtomicU64,
    waiting_us: AtomicU64,
}

/// The sums of [`TimeSpent`], each read on its own (a command in flight may be in one and
/// not yet in the other): subtract an earlier reading to time a stretch of work.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommandTimes {
    /// Commands the ledger accepted, no-ops included (refusals are not timed).
    pub commands: u64,
    /// Everything before the wait: in the ledger (a create's slug reservation, loading,
    /// deciding, storing, retries after conflicts).
    pub committing: Duration,
    /// Waiting for the read models to show the commit (read-your-writes): zero for a
    /// command that stored nothing.
    pub waiting: Duration,
}

impl std::ops::Sub for CommandTimes {
    type Output = Self;

    /// Panics when `earlier` was read later than `self`.
    fn sub(self, earlier: Self) -> Self {
        Self {
            commands: self.commands - earlier.commands,
            committing: self.committing - earlier.committing,
            waiting: self.waiting - earlier.waiting,
        }
    }
}

impl Orgledger {
    /// Wires the ledger and projector over one database; creates missing read-model tables.
    pub async fn open(database: Database, master_key: MasterKey) -> Result<Self, LedgerError> {
        Self::open_to_rebuild(database, master_key, &[]).await
    }

    /// Opens the service for a rebuild of the read models `to_rebuild`: those stored in an
    /// older schema are not rebuilt on the way in (see [`Projector::prepare_leaving`]).
    pub async fn open_to_rebuild(
        database: Database,
        master_key: MasterKey,
        to_rebuild: &[&str],
    ) -> Result<Self, LedgerError> {
        let ledger = Ledger::new(database.clone(), master_key);
        ledger.verify_master_key().await?;
        // Commands wait for the runner; with a pool of its own it never queues behind them.
        let runner_database = database.separate_pool(RUNNER_CONNECTIONS);
        let feed = Arc::new(StoreFeed::new(
            runner_database.clone(),
            ledger.keys().clone(),
        ));
        let projector = Arc::new(Projector::new(runner_database, feed).with_request_pool(database));
        projector
            .prepare_leaving(to_rebuild)
            .await
            .map_err(|error| LedgerError::Store(error.to_string()))?;
        Ok(Self::wired(ledger, projector))
    }

    fn wired(ledger: Ledger, projector: Arc<Projector>) -> Self {
        Self {
            ledger,
            projector,
            consistency_wait_us: AtomicU64::new(DEFAULT_CONSISTENCY_WAIT.as_micros() as u64),
            time_spent: TimeSpent::default(),
        }
    }

    /// Opens the service to read only (`orgledger verify` and `export`): unlike [`Orgledger::open`], it
    /// creates and rebuilds no read-model table. The caller has checked the migrations.
    pub async fn open_to_read(
        database: Database,
        master_key: MasterKey,
    ) -> Result<Self, LedgerError> {
        let ledger = Ledger::new(database.clone(), master_key);
        // The data keys: the events' MACs are for `verify` to report on, one by one, and a
        // reader stores nothing under a wrong key. With no data key left (every organization
        // purged), only the MACs can tell a wrong key, which would otherwise read as every
        // event altered.
        if !ledger.keys().verify_master_key().await? {
            ledger.verify_master_key().await?;
        }
        let feed = Arc::new(StoreFeed::new(database.clone(), ledger.keys().clone()));
        let projector = Arc::new(Projector::new(database, feed));
        Ok(Self::wired(ledger, projector))
    }

    /// Closes the connections of the ledger and of the projection runner.
    pub async fn close(&self) {
        self.ledger.database().close().await;
        self.projector.database().close().await;
    }

    pub fn database(&self) -> &Database {
        self.ledger.database()
    }

    /// How long a command waits for the read models before it answers with
    /// `X-Consistency: pending`.
    pub fn consistency_wait(&self) -> Duration {
        Duration::from_micros(self.consistency_wait_us.load(Ordering::Relaxed))
    }

    /// Sets [`Orgledger::consistency_wait`]; zero answers as soon as the events are stored,
    /// always `pending` (nothing is checked). Commands already waiting keep their own wait.
    /// At most [`MAX_CONSISTENCY_WAIT`]; a wait shorter than a microsecond is one.
    pub fn set_consistency_wait(&self, wait: Duration) {
        let wait = wait.min(MAX_CONSISTENCY_WAIT);
        let micros = (wait.as_micros() as u64).max(u64::from(!wait.is_zero()));
        self.consistency_wait_us.store(micros, Ordering::Relaxed);
    }

    /// Where commands have spent their time so far.
    pub fn command_times(&self) -> CommandTimes {
        let micros = |sum: &AtomicU64| Duration::from_micros(sum.load(Ordering::Relaxed));
        CommandTimes {
            commands: self.time_spent.commands.load(Ordering::Relaxed),
            committing: micros(&self.time_spent.committing_us),
            waiting: micros(&self.time_spent.waiting_us),
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
        let (committed, created) = self
            .ledger
            .personal_organization(command, false, context)
            .await?;
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
        self.time_spent.commands.fetch_add(1, Ordering::Relaxed);
        self.time_spent
            .committing_us
            .fetch_add(committing.as_micros() as u64, Ordering::Relaxed);
        metrics::histogram!("orgledger_command_commit_seconds").record(committing.as_secs_f64());
        if committed.events.is_empty() {
            metrics::histogram!("orgledger_command_read_model_wait_seconds").record(0.0);
            return Ok(Outcome {
                committed,
                consistent: true,
            });
        }
        self.projector.committed();
        let wait = self.consistency_wait();
        if wait.is_zero() {
            // Not waiting is not checking either: a process that does not run the projections
            // would ask the database.
            metrics::histogram!("orgledger_command_read_model_wait_seconds").record(0.0);
            return Ok(Outcome {
                committed,
                consistent: false,
            });
        }
        let waiting_since = Instant::now();
        let consistent = self
            .projector
            .wait_for(
                &committed.organization_id.to_string(),
                committed.version as i64,
                wait,
            )
            .await;
        // Timed whatever the outcome, so that both histograms count the same commands.
        let waited = waiting_since.elapsed();
        self.time_spent
            .waiting_us
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        metrics::histogram!("orgledger_command_read_model_wait_seconds")
            .record(waited.as_secs_f64());
        // The events are stored whatever the wait's fate: a failure to learn whether the read
        // models show them is `pending`, never an error that would invite running it again.
        let consistent = match consistent {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(organization_id = %committed.organization_id, version = committed.version, "read models still behind after the consistency wait");
                false
            }
            Err(error) => {
                tracing::error!(organization_id = %committed.organization_id, version = committed.version, %error, "could not learn whether the read models show a stored command");
                false
            }
        };
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
