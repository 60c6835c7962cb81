from services.stats.models import MainBase
from shared.migrations import run_env

run_env(MainBase.metadata)
