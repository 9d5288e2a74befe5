-- An append that carries a claim is stored only while the claim is still its own and
-- unanswered: the append looks the claim up by its id, in the append's transaction (see
-- `OrganizationRepository::append`). A retry that took the claim over then either waited for
-- that transaction (and finds its events) or made it store nothing.
CREATE INDEX idempotency_keys_by_claim ON idempotency_keys (claim_id) WHERE claim_id IS NOT NULL;
