"""stats — aggregates of doses (統計情報) fed by the dose events; never a name or a My Number."""
