from services.common.migrate import run_env
from services.records import models

run_env("records", models.TABLES)
