"""Integrations with task queues, each behind its own extra and imported only when used:
``agentbill.contrib.celery`` (``pip install 'agentbill-redis[celery]'``) and
``agentbill.contrib.rq`` (``pip install 'agentbill-redis[rq]'``)."""
