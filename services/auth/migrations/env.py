from services.auth import models
from services.common.migrate import run_env

run_env("auth", models.TABLES)
