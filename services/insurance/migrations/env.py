from services.common.migrate import run_env
from services.insurance import models

run_env("insurance", models.TABLES)
