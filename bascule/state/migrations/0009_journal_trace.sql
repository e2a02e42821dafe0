-- On-call ([9/12]): a journaled write carries the W3C traceparent of the researcher's request
-- that journaled it (bascule's span of it), so that its replay's span links to that request.
-- Ids only: a trace id and a span id, never anything of the request itself.
ALTER TABLE bascule_journal ADD COLUMN traceparent text;
