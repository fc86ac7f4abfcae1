-- metadata.chunks is kept in the row too (the chunk rows stay the source the API reads):
-- fill it in for recordings written before it was.
UPDATE session_recordings r SET metadata = jsonb_set(r.metadata, '{chunks}',
    (SELECT COALESCE(jsonb_agg(jsonb_build_object('index', c.chunk_index, 'bytes', c.bytes,
        'sha256', c.sha256) ORDER BY c.chunk_index), '[]'::jsonb)
     FROM session_recording_chunks c WHERE c.session_id = r.id));
