"""records — dose records (接種記録), their corrections and the outbox, partitioned by issuing municipality."""
