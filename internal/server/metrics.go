package server

import (
	"log/slog"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// httpMetrics are the API server's own metrics.
type httpMetrics struct {
	inFlight prometheus.Gauge
	refused  prometheus.Counter
}

func newHTTPMetrics() *httpMetrics {
	return &httpMetrics{
		inFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "noid_http_requests_in_flight", Help: "API requests being served, exec and console streams included.",
		}),
		refused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "noid_http_connections_refused_total", Help: "TCP connections closed at once because their client address had max_conns_per_client open.",
		}),
	}
}

// metricsHandler serves the exposition of a registry with the Go runtime
// and process collectors, the manager's collector and the server's own
// metrics.
func (s *Server) metricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		s.mgr.Collector(),
		s.metrics.inFlight,
		s.metrics.refused,
	)
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:      slog.NewLogLogger(s.log.Handler(), slog.LevelError),
		ErrorHandling: promhttp.ContinueOnError,
	})
}

// hMetrics serves /metrics to admins. It counts every user's VMs,
// checkpoints and disk use, so anyone else gets 404 like the other admin
// routes.
func (s *Server) hMetrics(w http.ResponseWriter, r *http.Request) error {
	if err := requireAdmin(r, "reading metrics"); err != nil {
		return err
	}
	s.metricsOnce.Do(func() { s.promHandler = s.metricsHandler() })
	s.promHandler.ServeHTTP(w, r)
	return nil
}
