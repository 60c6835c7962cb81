from services.gateway.models import MainBase
from shared.migrations import run_env

run_env(MainBase.metadata)
