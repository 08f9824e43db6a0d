from services.common.migrate import run_env
from services.review import models

run_env("review", models.TABLES)
