"""The HTTP front end: app factory (``app``), one router per resource (``routes``), the shared
context (``context``), pydantic schemas, keys and rate limits (``auth``, ``limits``), body parsing
(``body``) and the one place errors become HTTP answers (``errors``)."""
