-- metadata.chunks is kept in the row too (the chunk rows stay the source the API reads):
-- fill it in for recordings written before it was.
UPDATE session_recordings SET metadata = json_set(metadata, '$.chunks',
    json((SELECT json_group_array(json_object('index', c.chunk_index, 'bytes', c.bytes,
        'sha256', c.sha256) ORDER BY c.chunk_index)
     FROM session_recording_chunks c WHERE c.session_id = session_recordings.id)));
