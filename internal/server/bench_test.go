package server_test

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/internal/testwait"
	"github.com/machineservice/machineservice/wire"
)

// Environment of the client process that BenchmarkIdleAgentMemory starts.
const (
	envClientServer = "MACHINESERVICE_BENCH_SERVER"
	envClientCount  = "MACHINESERVICE_BENCH_CLIENTS"
	envClientKey    = "MACHINESERVICE_BENCH_SERVER_KEY"
)

// TestBenchClientProcess is not a test: it is the client side of
// BenchmarkIdleAgentMemory, run in a child process so that the
// benchmark's own memory figures are the server's alone. It connects and
// authenticates the requested number of agents, prints "ready", and holds
// them until its standard input closes.
func TestBenchClientProcess(t *testing.T) {
	base := os.Getenv(envClientServer)
	if base == "" {
		t.Skip("only run as the client process of BenchmarkIdleAgentMemory")
	}
	n, err := strconv.Atoi(os.Getenv(envClientCount))
	if err != nil {
		t.Fatal(err)
	}
	serverKey, err := wire.ParsePublicKey(os.Getenv(envClientKey))
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]*testclient.Conn, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			a := testclient.DialAgent(t, base, serverKey, 1+i%4)
			if !a.AuthAgent(agentA1).Accepted {
				t.Error("auth refused")
			}
			conns[i] = a
		}()
	}
	wg.Wait()
	fmt.Println("ready")
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
}

// BenchmarkIdleAgentMemory measures the server's memory per idle
// authenticated agent connection. The agents live in a child process.
func BenchmarkIdleAgentMemory(b *testing.B) {
	const clients = 2000
	for range b.N {
		b.StopTimer()
		e := startBench(b)
		beforeHeap, beforeStack := serverMemory()

		cmd := exec.Command(os.Args[0], "-test.run=^TestBenchClientProcess$", "-test.v")
		cmd.Env = append(os.Environ(), envClientServer+"="+e.base, envClientCount+"="+strconv.Itoa(clients),
			envClientKey+"="+wire.EncodePublicKey(&testclient.Key(b, serverKeyIndex).PublicKey))
		stdin, _ := cmd.StdinPipe()
		stdout, _ := cmd.StdoutPipe()
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		sc := bufio.NewScanner(stdout)
		ready := false
		for sc.Scan() {
			if strings.TrimSpace(sc.Text()) == "ready" {
				ready = true
				break
			}
		}
		if !ready {
			b.Fatal("client process did not get ready")
		}
		testwait.For(b, "the clients to authenticate", 2*time.Minute, func() bool { return e.stats.Get(stats.AuthClientSuccess) >= clients })
		afterHeap, afterStack := serverMemory()
		b.ReportMetric(float64(afterHeap+afterStack-beforeHeap-beforeStack)/clients, "bytes/conn")
		b.ReportMetric(float64(afterHeap-beforeHeap)/clients, "heap-bytes/conn")
		b.ReportMetric(float64(afterStack-beforeStack)/clients, "stack-bytes/conn")
		if p := os.Getenv("MACHINESERVICE_BENCH_HEAPPROFILE"); p != "" {
			f, err := os.Create(p)
			if err == nil {
				_ = pprof.WriteHeapProfile(f)
				_ = f.Close()
			}
		}
		_ = stdin.Close()
		_ = cmd.Wait()
	}
}

// serverMemory is the heap and stack memory in use after full GCs (each
// GC may halve an idle goroutine's stack).
func serverMemory() (heap, stack uint64) {
	var m runtime.MemStats
	for range 5 {
		runtime.GC()
	}
	runtime.ReadMemStats(&m)
	return m.HeapInuse, m.StackInuse
}

// BenchmarkAgentCommandRelay measures a portal command relayed to an agent
// and its answer relayed back, by payload size: two JWE operations on the
// server per round trip (decrypt the agent's answer, encrypt the command).
func BenchmarkAgentCommandRelay(b *testing.B) {
	for _, size := range []int{256, 16 << 10, 256 << 10} {
		b.Run(strconv.Itoa(size), func(b *testing.B) {
			e := startBench(b)
			agent := testclient.DialAgent(b, e.base, &testclient.Key(b, serverKeyIndex).PublicKey, 1)
			if !agent.AuthAgent(agentA1).Accepted {
				b.Fatal("auth")
			}
			portal := testclient.DialPortal(b, e.base)
			if !portal.AuthPortal(portalA, false).Accepted {
				b.Fatal("auth")
			}
			body := strings.Repeat("A", size)
			req := testclient.Message(wire.TypeCommand, agent.ClientID, wire.CommandRequest{Method: "POST", Path: "/x", Body: &body})
			ans := testclient.Message(wire.TypeCommand, portal.ClientID, wire.CommandResponse{StatusCode: 200, Body: &body})
			ansFrame := agent.Encode(ans)
			b.SetBytes(int64(2 * size))
			b.ResetTimer()
			for range b.N {
				portal.Send(req)
				if _, err := agent.Read(); err != nil {
					b.Fatal(err)
				}
				agent.SendRaw(ansFrame)
				if _, err := portal.Read(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkDecrypt is the floor for an agent message: one JWE decryption
// with the server's RSA-2048 key.
func BenchmarkDecrypt(b *testing.B) {
	key := testclient.Key(b, serverKeyIndex)
	env := testclient.Message(wire.TypePing, "server", nil)
	env.From, env.MessageID = "client", "id"
	data, err := wire.SealEnvelope(env, wire.StyleString, &key.PublicKey)
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for range b.N {
		if _, err := wire.OpenEnvelope(data, key); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAgentPing measures one agent ping answered with a pong over
// loopback: a decryption and an encryption on the server.
func BenchmarkAgentPing(b *testing.B) {
	e := startBench(b)
	agent := testclient.DialAgent(b, e.base, &testclient.Key(b, serverKeyIndex).PublicKey, 1)
	if !agent.AuthAgent(agentA1).Accepted {
		b.Fatal("auth")
	}
	frame := agent.Encode(&wire.Envelope{From: agent.ClientID, To: "server", Type: wire.TypePing, MessageID: "p"})
	b.ResetTimer()
	for range b.N {
		if err := agent.WS.WriteMessage(websocket.TextMessage, frame); err != nil {
			b.Fatal(err)
		}
		if _, _, err := agent.WS.ReadMessage(); err != nil {
			b.Fatal(err)
		}
	}
}
