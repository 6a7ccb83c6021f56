package api

import "time"

// File copy wire types: PUT and GET /v1/vms/{name}/files.
//
// PUT /v1/vms/{name}/files?dir=/abs/dir takes a tar stream
// (application/x-tar) as its body and extracts it into dir in the guest
// (created if missing); it answers with a PutFilesResult.
//
// GET /v1/vms/{name}/files?path=/abs/path answers with a tar stream of path
// (a file, or a directory with everything below it; symlinks are stored, not
// followed); entry names start with path's base name. A failure after the
// stream started is reported in the FilesErrorTrailer HTTP trailer. With
// stat=true it answers with a FileInfo instead.

// FilesErrorTrailer is the HTTP trailer that carries an error that ended a
// GET /v1/vms/{name}/files stream early. It is empty on success.
const FilesErrorTrailer = "X-Noid-Error"

// PutFilesResult reports a finished upload.
type PutFilesResult struct {
	// Entries is the number of tar entries written.
	Entries int `json:"entries"`
	// Bytes is the number of file content bytes written.
	Bytes int64 `json:"bytes"`
}

// File types reported in FileInfo.Type.
const (
	FileTypeFile    = "file"
	FileTypeDir     = "dir"
	FileTypeSymlink = "symlink"
)

// FileInfo describes one path in a guest (GET …/files?stat=true).
type FileInfo struct {
	// Path is the path that was asked for, cleaned.
	Path string `json:"path"`
	// Type is "file", "dir" or "symlink".
	Type string `json:"type"`
	// Mode holds the permission bits (and setuid, setgid, sticky) as a number.
	Mode uint32 `json:"mode"`
	// Size is the size of a file in bytes (0 for others).
	Size int64 `json:"size"`
	// ModTime is the modification time.
	ModTime time.Time `json:"mtime"`
	// LinkTarget is where a symlink points.
	LinkTarget string `json:"link_target,omitempty"`
}
