from services.registry.models import ShardBase
from shared.migrations import run_env

run_env(ShardBase.metadata)
