"""The real-time layer's rate-limited logs: never silent, never a flood."""

import logging

from django.conf import settings

from freeagentics.log_summary import SummaryLog

logger = logging.getLogger("realtime")

# Failures and drops (WARNING), and refused connections (INFO: expected, but counted).
problems = SummaryLog(logger, interval=settings.LOG_SUMMARY_SECONDS)
refusals = SummaryLog(logger, interval=settings.LOG_SUMMARY_SECONDS, level=logging.INFO)
