from services.common.migrate import run_env
from services.intake import models

run_env("intake", models.TABLES)
