SELECT COUNT(*) FROM pragma_table_info('documents') WHERE name = 'version'
