INSERT INTO messages (position, time, stream_name, category, type, data, metadata, id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
