from services.records.models import ShardBase
from shared.migrations import run_env

run_env(ShardBase.metadata)
